"""`python -m slothbook ...` is `slothbook ...`."""

import sys

from .cli import main

sys.exit(main())
