"""Calling a service through its live view: load balancers, outlier ejection, retry policy
and budget (pure), and an httpx transport that uses them.

May import: ``busreg.client``, ``busreg.wire`` and below.
"""
