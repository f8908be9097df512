"""The kernel layer stands alone: importing it pulls in neither transformers nor bitsandbytes."""

import subprocess
import sys


def test_kernels_import_without_transformers_or_bitsandbytes():
    code = ("import os, sys; os.environ.setdefault('TRITON_INTERPRET', '1'); import slothbook.kernels; "
            "bad = [m for m in ('transformers', 'bitsandbytes', 'peft', 'trl') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
