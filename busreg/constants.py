"""Names, key layouts and timings in one place, each with the reason it has that value.

Every RabbitMQ name and Redis key busreg uses is built here from the namespace, so two
registries (or two test runs) sharing one broker and one Redis never see each other.
"""

from __future__ import annotations

from typing import Any

#: Version of the event, delta and snapshot contracts. Bump on an incompatible change;
#: workers dead-letter events of a version they do not know (invariant 6).
PROTOCOL_VERSION = 1
#: The batched-heartbeat event (``{"v": 2, "type": "heartbeats"}``, one per partition and
#: renewal interval for a process holding many registrations) is contract v2: a worker that
#: predates it dead-letters it as ``unknown-version`` and changes nothing, so workers are
#: upgraded first. Workers speak both; every other event stays v1.
BATCH_PROTOCOL_VERSION = 2
#: The contract versions this worker accepts.
PROTOCOL_VERSIONS = (PROTOCOL_VERSION, BATCH_PROTOCOL_VERSION)

#: Hash seed of RabbitMQ's own super-stream hash routing (murmur3, 32 bit, seed 104729):
#: the Java, .NET and Go stream clients route a routing key to the same partition we do.
PARTITION_HASH_SEED = 104729

#: Largest ingest event we accept. A registration with its metadata is a few hundred bytes;
#: anything near this limit is a mistake or an attack and is dead-lettered as oversized.
MAX_EVENT_BYTES = 16 * 1024
#: Largest batched-heartbeat event, and most heartbeats in one: each item is a heartbeat
#: as it would be sent alone (≤ MAX_EVENT_BYTES, ~250 B typical), so a batch of 200 is ~55 KB.
MAX_BATCH_BYTES = 256 * 1024
MAX_BATCH_ITEMS = 500

#: Separator inside Redis hash fields (``service<US>instance``). ASCII unit separator: it can
#: never appear in a validated service or instance name.
FIELD_SEPARATOR = "\x1f"


def ingest_super_stream(namespace: str) -> str:
    """The super stream (an exchange with ``x-super-stream: true``) events are written to."""
    return f"{namespace}.ingest"


def ingest_partition(namespace: str, partition: int) -> str:
    """Partition stream ``<super stream>-<k>``: the name RabbitMQ's own tooling gives it."""
    return f"{ingest_super_stream(namespace)}-{partition}"


def service_exchange(namespace: str, service: str) -> str:
    """Per-service topic exchange carrying that service's deltas only (no NIC storm)."""
    return f"{namespace}.svc.{service}"


def group_queue(namespace: str, service: str, group: str) -> str:
    """Durable queue shared by the members of one consumer group of one service."""
    return f"{namespace}.group.{service}.{group}"


def rpc_queue(namespace: str) -> str:
    """Queue every worker consumes snapshot/list requests from (competing consumers)."""
    return f"{namespace}.rpc"


def worker_notice_queue(namespace: str, worker: str) -> str:
    """A worker's own exclusive queue for notices from its peers (server/notices.py)."""
    return f"{namespace}.worker.{worker}"


def dead_letter_exchange(namespace: str) -> str:
    """Fanout exchange receiving every event a worker could not apply, with its reason."""
    return f"{namespace}.deadletter"


def dead_letter_queue(namespace: str) -> str:
    """Durable queue bound to the dead-letter exchange, read by ``busreg deadletters``."""
    return f"{namespace}.deadletter"


def partition_key_prefix(namespace: str, partition: int) -> str:
    """Prefix of every Redis key of one partition.

    The ``{...}`` hash tag puts all keys of a partition in one Redis Cluster slot, so one Lua
    script can update lease table, offset and outbox atomically (invariant 2).
    """
    return f"busreg:{{{namespace}.{partition}}}:"


def cluster_key_prefix(namespace: str) -> str:
    """Prefix of the controller keys (live workers) that are not tied to a partition."""
    return f"busreg:{{{namespace}}}:"


# Suffixes of partition keys (see partition_key_prefix). Lua builds the per-service keys
# itself from the same prefix, so the layout is documented in busreg/server/lua/apply.lua too.
KEY_STATE = "state"  # hash: fence, epoch, offset, last_ts, clock, counters
KEY_LEASE = "lease"  # string "<worker>|<token>" with PX expiry on Redis' clock
KEY_OUTBOX = "outbox"  # list of pending deltas / dead letters, drained with confirms
KEY_WORKERS = "workers"  # zset worker id -> membership deadline (Redis ms), cluster prefix
KEY_BUSY = "busy"  # set of partitions with live leases (standbys tick those), cluster prefix
KEY_REV = "rev"  # hash: service -> revision
KEY_DEADLINES = "deadlines"  # zset svc<US>id -> lease deadline on the partition clock
KEY_TOMB = "tomb"  # hash svc<US>id -> version at removal
KEY_TOMB_DEADLINES = "tombdl"  # zset svc<US>id -> when the tombstone is forgotten
KEY_OVERRIDES = "ovr"  # hash svc<US>id -> incarnation .. operator status override JSON
KEY_SERVICE = "s:"  # + service name: hash instance id -> version .. stored JSON

#: The fixed keys apply.lua declares first, in this order (the service hashes follow).
APPLY_KEYS = (
    KEY_STATE,
    KEY_REV,
    KEY_DEADLINES,
    KEY_TOMB,
    KEY_TOMB_DEADLINES,
    KEY_OUTBOX,
    KEY_OVERRIDES,
)

# --- queue arguments --------------------------------------------------------------------

#: Snapshot requests older than this are useless (their caller has timed out): the broker
#: drops them.
RPC_MESSAGE_TTL_MS = 10_000
#: Dead letters kept for operators; beyond this the oldest are dropped (bounded memory).
DEAD_LETTER_MAX = 100_000


def rpc_queue_arguments() -> dict[str, Any]:
    """Arguments of ``<ns>.rpc``. Quorum: a classic queue lives on one node, and with that
    node gone no worker could answer a snapshot request (RabbitMQ >= 3.10 keeps message TTL
    on quorum queues)."""
    return {"x-queue-type": "quorum", "x-message-ttl": RPC_MESSAGE_TTL_MS}


def dead_letter_queue_arguments() -> dict[str, Any]:
    """Arguments of ``<ns>.deadletter``: quorum (replicated, so dead letters survive a node
    loss), bounded, oldest dropped first."""
    return {"x-queue-type": "quorum", "x-max-length": DEAD_LETTER_MAX, "x-overflow": "drop-head"}


#: Deliveries of one delta to a consumer group before it is dead-lettered (a handler that
#: raises on it).
DELIVERY_LIMIT = 5
#: Group backlog bound; past it the oldest deltas are dropped. A group that far behind
#: should re-read snapshots rather than replay stale history.
GROUP_QUEUE_MAX = 100_000

# --- timings (defaults; all are settings) ---------------------------------------------

#: Heartbeat every second and a 3 s TTL, as the seed's own registry design asks: three
#: missed beats before an instance is declared dead, so one lost packet never expires it.
DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_TTL = 3.0

#: The owner never ticks a quiet partition more often than this. Ticks are the watermark: an
#: instance is only expired once a tick newer than its deadline has been *consumed*; the
#: owner ticks when the first lease falls due (server/tickplan.py), so detection takes TTL
#: + a few ms to apply and publish, or up to one tick interval when leases fall due close
#: together.
DEFAULT_TICK_INTERVAL = 0.1

#: Every worker also ticks the partitions it does not own this often, so a partition whose
#: owner died shows no gap in broker time while the next owner takes over (a gap longer
#: than the max clock step reads as an ingest outage). Half the max clock step: one late
#: or lost standby tick still leaves no such gap.
DEFAULT_STANDBY_TICK_INTERVAL = 0.5

#: A partition with no live lease needs no tick for expiry or the outage logic; its owner
#: still ticks it this often, so a subscription that went silent is noticed (server/
#: tickplan.py). Slow enough that an idle namespace costs next to nothing (8 partitions:
#: 1.6 ticks a second), fast enough that a registration into a partition whose
#: subscription died waits seconds, not minutes.
IDLE_PROBE_INTERVAL = 5.0

#: A tick for a lease that falls due is written this long after its deadline would be
#: reached, so the tick's broker timestamp is past it (the delivery's own latency only adds).
DUE_TICK_MARGIN = 0.005

#: A jump in broker time between two consecutive events of a partition larger than this is
#: an ingest outage (broker down, every writer cut off), not time in which instances failed
#: to heartbeat: the lease clock advances by at most this much per step (invariant 4).
DEFAULT_MAX_CLOCK_STEP = 1.0

#: After an ingest outage (a gap in broker time larger than the max clock step) expiry
#: waits this long on the partition clock, so instances can reconnect and heartbeat again.
#: Clients re-create their stream connection on the next heartbeat after a failure (a few
#: seconds at most after the broker is back); the grace leaves room for that on a loaded
#: machine. A dead instance is detected this much later after an outage, never earlier.
DEFAULT_OUTAGE_GRACE = 10.0

#: One attempt to write an outage mark (server/ticker.py). Longer than a tick's: the mark
#: goes to a stream that has just lost its leader, and it is retried until confirmed.
OUTAGE_MARK_TIMEOUT = 1.0

#: Longest lease TTL (seconds). Eureka clients (Spring Cloud, through the gateway's Eureka
#: API) default to a 90 s lease renewed every 30 s; 120 s admits that with room to spare.
MAX_TTL = 120.0
#: Where a worker starts reading a partition that has no committed offset (fresh or lost
#: Redis): this far back in the stream. Heartbeats carry the whole registration, so one TTL
#: of history rebuilds every live instance (and brings back, to expire them, those that died
#: less than a TTL ago): the longest allowed TTL, plus 30 s for consumer lag and for the
#: difference between the broker's timestamps and the worker's clock.
DEFAULT_REPLAY_WINDOW = MAX_TTL + 30.0
#: Longest heartbeat interval (seconds): a registration must renew well within its TTL.
MAX_HEARTBEAT_INTERVAL = 30.0

#: Remember a removed instance's (incarnation, sequence) this long, so a late duplicate of
#: one of its old heartbeats (a publisher's retry, a lagging consumer) cannot bring it back
#: (no invented state): ample for that, and above two of the longest TTL.
DEFAULT_TOMBSTONE_TTL = 300.0

#: Partition ownership lease. A SIGKILLed worker's partitions are free after this long;
#: renewals happen every third of it so two lost renewals are survivable.
DEFAULT_LEASE_TTL = 1.5

#: A registration returns once the broker confirmed it; give up after this long.
DEFAULT_CONFIRM_TIMEOUT = 5.0

#: A worker's own broker round trips (a partition's stream subscribe, the confirms of a
#: batch of deltas) fail after this long instead of waiting for ever: a stuck request must
#: not pin a partition (its runner retries, or hands the partition back). rstream's own
#: request timeout is 10 s per request, and a subscribe makes several.
WORKER_BROKER_TIMEOUT = 5.0
#: How long a starting worker keeps trying to reach Redis, the broker and the stream port
#: (connection errors only; refused credentials end it at once). A worker restarted while
#: one of them is briefly away (a restart, a failover, a flaky path) comes up once it is
#: back instead of exiting; past this it is an outage or a wrong URL, and it says so.
WORKER_START_TIMEOUT = 30.0
#: Pause between AMQP reconnection attempts (aio-pika's default is 5 s). Watchers miss
#: deltas while disconnected and re-read their snapshot after; registrants and workers
#: need their AMQP path back within a TTL, and with several nodes the next attempt goes
#: to another node, so there is no reason to wait long.
AMQP_RECONNECT_INTERVAL = 1.0
#: A partition's subscription that delivers nothing for this long while its owner's own
#: ticks are confirmed (so the stream grows) is taken for dead and made again. A partition
#: with leases is ticked at least every half clock step when quiet, so 3 s is at least six
#: missed deliveries, and well inside a TTL; one without leases only gets probe ticks, and
#: the limit there is two probe intervals (tickplan.TickPlan.silence_limit).
SUBSCRIPTION_SILENCE = 3.0
