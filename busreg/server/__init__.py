"""The shard worker: membership and partition leases, one runner per owned partition, Redis
lease tables via Lua, the outbox, snapshot answers and worker metrics.

May import: ``busreg.transport``, ``busreg.wire`` and below; never ``busreg.client``.
"""
