"""``python -m busreg.bench [options]``: the same as ``busreg bench`` (settings from the
``BUSREG_*`` environment)."""

from __future__ import annotations

import logging
import sys

from ..errors import BusregError
from ..settings import load_settings
from . import main

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        sys.exit(main(sys.argv[1:], load_settings()))
    except BusregError as exc:
        print(f"busreg bench: error: {exc}", file=sys.stderr)
        sys.exit(1)
