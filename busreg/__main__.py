import sys

from busreg.ops.cli import main

sys.exit(main())
