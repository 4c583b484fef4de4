#!/usr/bin/env python3
"""Generate brokers/rabbitmq/definitions.json from busreg's own names and defaults.

The compose stack's RabbitMQ imports this file at boot (``load_definitions``), so the
default namespace's topology exists before any worker starts. Every name and argument is
taken from ``busreg.constants``, ``busreg.settings`` and ``busreg.transport.topology``, which is
what ``apply_topology`` declares at run time; regenerate after changing any
of them:

    python brokers/gen_definitions.py            # rewrite the file
    python brokers/gen_definitions.py --check    # exit 1 if the file is stale (CI)

Users: ``busreg`` (administrator; the compose workers log in with it, because ``guest``
may only connect from localhost), one least-privilege user per example service (``cart``,
``inventory``, ``billing``; permissions from ``busreg.transport.topology.service_user_permissions``)
and ``guest`` (kept: a node that imports definitions at
boot does not create its default user). Password hashes use RabbitMQ's
``rabbit_password_hashing_sha256``: base64(salt[4] + sha256(salt + password)). The salt is
derived from the user name so that regenerating gives a byte-identical file; these are
development credentials for a local stack, not secrets.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing busreg
    sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = REPO / "brokers" / "rabbitmq" / "definitions.json"
VHOST = "/"
#: Example per-service users (the seed's e-commerce services).
SERVICE_USERS = ("cart", "inventory", "billing")
RABBITMQ_VERSION = "3.10.8"


def password_hash(user: str, password: str) -> str:
    """rabbit_password_hashing_sha256 with a salt derived from the user name."""
    salt = hashlib.sha256(f"busreg-dev-salt:{user}".encode()).digest()[:4]
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def user(name: str, password: str, tags: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "password_hash": password_hash(name, password),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": tags,
        "limits": {},
    }


def full_permissions(name: str) -> dict[str, str]:
    return {"user": name, "vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*"}


def build(namespace: str, partitions: int, busreg_password: str) -> dict[str, Any]:
    # Imported here so that --help works even when busreg is half-written.
    from busreg import constants as c
    from busreg.settings import Settings
    from busreg.transport.topology import ingest_stream_arguments, service_user_permissions

    # Build from defaults only: BUSREG_* variables of the calling shell must not leak in.
    for key in [k for k in os.environ if k.upper().startswith("BUSREG_")]:
        del os.environ[key]
    settings = Settings(namespace=namespace, partitions=partitions)
    ns = settings.namespace

    super_stream = c.ingest_super_stream(ns)
    exchanges: list[dict[str, Any]] = [
        {
            "name": super_stream,
            "vhost": VHOST,
            "type": "direct",
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {"x-super-stream": True},
        },
        {
            "name": c.dead_letter_exchange(ns),
            "vhost": VHOST,
            "type": "fanout",
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        },
    ]
    queues: list[dict[str, Any]] = []
    bindings: list[dict[str, Any]] = []
    for k in range(settings.partitions):
        queues.append(
            {
                "name": c.ingest_partition(ns, k),
                "vhost": VHOST,
                "durable": True,
                "auto_delete": False,
                "arguments": ingest_stream_arguments(settings),
            }
        )
        bindings.append(
            {
                "source": super_stream,
                "vhost": VHOST,
                "destination": c.ingest_partition(ns, k),
                "destination_type": "queue",
                "routing_key": str(k),
                "arguments": {"x-stream-partition-order": k},
            }
        )
    queues.append(
        {
            "name": c.rpc_queue(ns),
            "vhost": VHOST,
            "durable": True,
            "auto_delete": False,
            "arguments": c.rpc_queue_arguments(),
        }
    )
    queues.append(
        {
            "name": c.dead_letter_queue(ns),
            "vhost": VHOST,
            "durable": True,
            "auto_delete": False,
            "arguments": c.dead_letter_queue_arguments(),
        }
    )
    bindings.append(
        {
            "source": c.dead_letter_exchange(ns),
            "vhost": VHOST,
            "destination": c.dead_letter_queue(ns),
            "destination_type": "queue",
            "routing_key": "",
            "arguments": {},
        }
    )
    # One least-privilege user per service of the seed's story (password = name: a local
    # development stack). Each may publish events for itself over AMQP only (its user_id is
    # its identity), watch services, read snapshots and consume its own groups.
    service_users = [user(name, name, []) for name in SERVICE_USERS]
    service_permissions = []
    for name in SERVICE_USERS:
        configure, write, read = service_user_permissions(ns, name)
        service_permissions.append(
            {"user": name, "vhost": VHOST, "configure": configure, "write": write, "read": read}
        )
    return {
        "rabbit_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "users": [
            user("busreg", busreg_password, ["administrator"]),
            user("guest", "guest", ["administrator"]),
            *service_users,
        ],
        "vhosts": [{"name": VHOST}],
        "permissions": [
            full_permissions("busreg"),
            full_permissions("guest"),
            *service_permissions,
        ],
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    }


def render(definitions: dict[str, Any]) -> str:
    return json.dumps(definitions, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default="busreg")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--busreg-password", default="busreg")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the file differs"
    )
    args = parser.parse_args(argv)

    text = render(build(args.namespace, args.partitions, args.busreg_password))
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current == text:
            print(f"{args.output}: up to date")
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                str(args.output),
                "generated",
            )
        )
        print(f"{args.output} is stale: run python brokers/gen_definitions.py", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
