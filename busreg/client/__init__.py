"""What an application links: ``Registry``, registrations and heartbeats, live service views,
snapshot requests, consumer groups and client metrics.

May import: ``busreg.transport``, ``busreg.wire`` and below; never ``busreg.server``.
"""
