"""slothbook.forwards: patches stack under their own keys and unwind to exactly what was there."""

import torch
from torch import nn

from slothbook.forwards import inner_forward, patch_beneath, patch_forward, patched_over, reads_inner, unpatch_forward


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


def test_a_patch_goes_beneath_a_wrapper_that_reads_its_inner_forward_and_unwinds_in_any_order():
    x = torch.ones(1, 2)
    for first_out in ("outer", "beneath"):
        lin = nn.Linear(2, 2)
        plain = lin(x)
        patch_forward(lin, "outer", reads_inner(lambda t: inner_forward(lin, "outer")(t) + 1))
        wrapper = lin.forward
        patch_beneath(lin, "beneath", lambda t: torch.full((1, 2), 2.0))
        assert lin.forward is wrapper and torch.equal(lin(x), torch.full((1, 2), 3.0))
        assert not patched_over(lin, "beneath")
        assert unpatch_forward(lin, first_out)
        assert torch.equal(lin(x), torch.full((1, 2), 2.0) if first_out == "outer" else plain + 1)
        assert unpatch_forward(lin, "beneath" if first_out == "outer" else "outer")
        assert "forward" not in lin.__dict__ and torch.equal(lin(x), plain)


def test_a_wrapper_that_captured_its_inner_forward_is_not_gone_beneath():
    lin = nn.Linear(2, 2)
    inner = lin.forward
    patch_forward(lin, "outer", lambda t: inner(t) + 1)
    patch_beneath(lin, "late", lambda t: t)  # the wrapper would never call it: it goes on top instead
    assert torch.equal(lin(torch.ones(1, 2)), torch.ones(1, 2)) and patched_over(lin, "outer")
