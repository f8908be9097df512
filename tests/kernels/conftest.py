"""Kernel test setup: Triton's CPU interpreter when there is no GPU, a device fixture, and error checks.

Triton decides between compiling and interpreting when a ``@triton.jit`` function is decorated, i.e. when a kernel
module is imported, so the environment variable must be set here, before any test module imports
``slothbook.kernels.*``. pytest imports this conftest before the test modules of this folder.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    _early = sorted(m for m in sys.modules if m.startswith("slothbook.kernels."))
    if _early:
        raise RuntimeError(
            f"{_early} were imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
            "run with TRITON_INTERPRET=1 in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# Error bounds relative to the reference's size: fp32 is compared with a float64 reference, half types carry
# their own rounding (8 bits of mantissa for bf16).
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pytest_generate_tests(metafunc):
    """Every test taking a ``dtype`` argument runs in fp32, bf16 and fp16 (unless it parametrizes dtype itself)."""
    if "dtype" in metafunc.fixturenames and not any(
        "dtype" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")
    ):
        metafunc.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, name: str = ""):
    """Compare with an error relative to the reference's norm, plus an elementwise bound relative to its max.

    The norm check bounds the overall error; the max check catches a few wrong elements (a masking bug) that a
    norm over many correct elements would hide. Non-finite values (e.g. unwritten NaN poison) always fail.
    """
    tol = TOLERANCES[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite elements"
    scale_norm = e.norm().clamp_min(1e-30)
    scale_max = e.abs().max().clamp_min(1e-30)
    rel_norm = ((a - e).norm() / scale_norm).item()
    rel_max = ((a - e).abs().max() / scale_max).item()
    assert rel_norm <= tol, f"{name}: error {rel_norm:.3g} relative to the norm exceeds {tol}"
    assert rel_max <= tol, f"{name}: max error {rel_max:.3g} relative to the max exceeds {tol}"


def _poisoned(like: torch.Tensor) -> torch.Tensor:
    """A NaN-filled buffer shaped like ``like``: every element the kernel fails to write stays NaN."""
    return torch.full_like(like, float("nan"))


@pytest.fixture
def assert_close():
    """``assert_close(actual, expected, dtype=None, name="")``: see ``_assert_close``."""
    return _assert_close


@pytest.fixture
def poisoned():
    """``poisoned(like)``: a NaN-filled buffer shaped like ``like``."""
    return _poisoned


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed():
    """New random inputs in every test; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield
