"""The tutorial notebooks run top to bottom under nbval, as CI runs them: `pytest --nbval-lax` (a cell that raises
fails; saved outputs are not compared). They run on a copy, so their outputs/ folders land in a temporary
directory instead of beside the committed notebooks.

The same check by hand, from the repository root: python -m pytest --nbval-lax notebooks/
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ui.kernel import KERNEL_ENV

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
CELL_TIMEOUT_S = 300  # a cell that hangs fails with nbval's timeout error naming it
ALL_TIMEOUT_S = 1200  # the budget is 8 minutes on 2 idle cores; this leaves room for a shared machine


@pytest.mark.slow
@pytest.mark.timeout(ALL_TIMEOUT_S + 60)
def test_every_notebook_runs_under_nbval(tmp_path):
    pytest.importorskip("nbval", reason="needs nbval (pip install nbval)")
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names[:5] == ["01_quickstart.ipynb", "02_memory_profiler.ipynb", "03_long_context_offload.ipynb",
                         "04_export_gguf.ipynb", "05_studio.ipynb"]
    for name in names:
        shutil.copy(NOTEBOOKS / name, tmp_path / name)
    env = {**os.environ, **KERNEL_ENV}  # one torch thread: two spin-waiting ones crawl on a busy 2-core machine
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", f"--nbval-cell-timeout={CELL_TIMEOUT_S}", "-p",
         "no:cacheprovider", "-q", "--durations=0", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=ALL_TIMEOUT_S)
    print(run.stdout[-4000:])  # nbval's per-cell durations, shown with -s or on failure
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
