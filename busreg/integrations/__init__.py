"""Glue for application frameworks: FastStream consumer-group subscribers and app registration.

May import: ``busreg.client``, ``busreg.transport``, ``busreg.wire`` and below.
"""
