"""How the ``busreg`` command logs (the CLI is an application; the library only logs)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

__all__ = ["configure_logging"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str, fmt: str) -> None:
    """The CLI's logging: one handler on stderr, text or JSON lines (an application's
    choice: library code never configures logging)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # the broker libraries are chatty at INFO about reconnects we already report
    for noisy in ("aio_pika", "aiormq", "rstream"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # aiormq logs a failed connect at ERROR before busreg reports it in one line
    if root.level > logging.DEBUG:
        logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
