"""`python -m slothbook ...` is `slothbook ...`."""

import os
import sys

# `python -m` puts the working directory first on sys.path; in a slothbook checkout that exposes our top-level
# kernels/ folder under the name of Hugging Face's `kernels` package, which bitsandbytes probes.
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]

from .cli import main  # noqa: E402

sys.exit(main())
