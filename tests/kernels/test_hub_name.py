"""From a checkout, the top-level name `kernels` still means Hugging Face's distribution when it is installed.

transformers >= 5.25 imports `from kernels import CUDAProperties, ...`; with the repository root on sys.path (the
cwd of `python -c`, a Jupyter kernel, pytest) this folder would shadow it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_in_root(code: str, extra_path: str = "") -> str:
    env = {**os.environ, "PYTHONPATH": extra_path} if extra_path else None
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_top_level_name_goes_to_an_installed_kernels_package(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("from .props import CUDAProperties\n")
    (site / "kernels" / "props.py").write_text("CUDAProperties = 'theirs'\n")
    out = _run_in_root(
        """
        import sys, kernels, slothbook.kernels as ours
        leftovers = [m for m in sys.modules if m.startswith("kernels.") and m != "kernels.props"]
        print(kernels.CUDAProperties, kernels.__name__, ours.rms_norm.__module__, leftovers)
        """,
        extra_path=str(site),
    )
    assert out == "theirs kernels slothbook.kernels.rms_norm []"


def test_nothing_is_handed_over_when_only_the_checkout_provides_the_name(monkeypatch):
    from slothbook.kernels._hub_name import installed_hub_kernels

    monkeypatch.setattr(sys, "path", ["", str(ROOT)])
    monkeypatch.chdir(ROOT)
    before = sys.modules.get("kernels")
    assert installed_hub_kernels(str(ROOT / "kernels")) is None
    assert sys.modules.get("kernels") is before


def test_transformers_loads_from_the_checkout_root():
    try:
        version("kernels")
    except PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25 does not need it)")
    out = _run_in_root(
        """
        import kernels, transformers.integrations.hub_kernels
        from transformers import AutoModelForCausalLM
        print(kernels.CUDAProperties.__module__)
        """
    )
    assert out.startswith("kernels")
