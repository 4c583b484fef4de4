"""``python -m busreg.bench [options]``: the same as ``busreg bench`` (settings from the
``BUSREG_*`` environment)."""

from __future__ import annotations

import logging
import sys

from busreg.bench import main
from busreg.errors import BusregError
from busreg.settings import load_settings

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        sys.exit(main(sys.argv[1:], load_settings()))
    except BusregError as exc:
        print(f"busreg bench: error: {exc}", file=sys.stderr)
        sys.exit(1)
