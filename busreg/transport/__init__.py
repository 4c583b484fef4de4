"""Connections to RabbitMQ (AMQP, stream protocol) and Redis, the topology, stream writers.

The one place broker and Redis errors become busreg errors. May import: ``busreg.wire`` and below.
"""
