"""Run as `python -m cripy`."""

import sys

from cripy.cli.main import main

sys.exit(main())
