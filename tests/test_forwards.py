"""slothbook.forwards: patches stack under their own keys and unwind to exactly what was there."""

import torch
from torch import nn

from slothbook.forwards import patch_forward, patched_over, unpatch_forward


def test_patches_stack_and_unwind_to_the_class_forward():
    lin = nn.Linear(2, 2)
    x = torch.ones(1, 2)
    plain = lin(x)
    inner = lin.forward
    patch_forward(lin, "a", lambda t: inner(t) * 2)
    outer = lin.forward
    patch_forward(lin, "b", lambda t: outer(t) + 1)
    assert torch.equal(lin(x), plain * 2 + 1)
    assert patched_over(lin, "a") and not patched_over(lin, "b")
    assert unpatch_forward(lin, "b") and torch.equal(lin(x), plain * 2)
    assert unpatch_forward(lin, "a") and "forward" not in lin.__dict__
    assert not unpatch_forward(lin, "a")
    assert torch.equal(lin(x), plain)


def test_patching_twice_under_one_key_is_refused_and_an_own_forward_comes_back():
    lin = nn.Linear(2, 2)
    own = lambda t: t  # noqa: E731
    lin.forward = own
    patch_forward(lin, "k", lambda t: -t)
    try:
        patch_forward(lin, "k", lambda t: t)
    except RuntimeError as exc:
        assert "already patched" in str(exc)
    else:
        raise AssertionError("a second patch under the same key must be refused")
    unpatch_forward(lin, "k")
    assert lin.forward is own
