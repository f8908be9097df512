"""Fused lm_head + cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without the full logits.

The tokens are split into chunks. For each chunk the forward pass computes the chunk's logits with one
matmul, runs the cross-entropy kernel on them in "loss and gradient" mode (the gradient overwrites the
chunk's logits), and turns that gradient into the chunk's rows of ``grad_hidden`` and a contribution to
``grad_weight`` / ``grad_bias``. Only one chunk of logits exists at a time, and backward merely scales
the stored gradients by ``grad_output``.

Chunk size: by default a chunk's logits hold about as many elements as the hidden states themselves
(``chunk ~ N * H / V`` tokens, rounded down to a power of two, at least 64 so the matmuls stay
efficient, at most N). Peak extra memory is then about one more copy of the hidden states (plus
``grad_hidden``, and ``grad_weight`` when the weight is trained). E.g. Llama-3-8B (H 4096, V 128256)
with 8192 tokens: 256 tokens per chunk, a 64 MiB bf16 chunk of logits instead of 2 GiB of full logits.

Conventions:

- ``labels`` are already shifted: ``labels[i]`` is the target of ``hidden[i]``. Shifting (and
  masking the prompt with ``ignore_index``) is the caller's job.
- ``reduction="mean"`` averages over the non-ignored tokens of the whole batch (0 if there are none);
  ``"sum"`` returns the plain sum. The loss is float32.
- ``softcap``: Gemma-2 final-logit soft-capping, as in :mod:`.cross_entropy`.
- Matmuls run in the autocast dtype when autocast is on, else in ``weight.dtype`` (hidden is cast to
  it). ``grad_weight`` is accumulated across chunks in that dtype, like an eager bf16 lm_head would.
- The gradients are computed during forward even if backward never runs (only when some input needs
  a gradient and grad mode is on). Backward can run once per forward.
"""

from __future__ import annotations

import torch

from slothbook.errors import ConfigError

from .cross_entropy import _REDUCTIONS, cross_entropy_reference, cross_entropy_rows

__all__ = [
    "FusedLinearCrossEntropyFunction",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
]

# Fewer tokens per chunk than this makes the lm_head matmuls too thin to run at speed.
MIN_CHUNK_TOKENS = 64


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk so that ``chunk * vocab_size ~ n_tokens * hidden_size`` (see the module docstring)."""
    rows = max(1, n_tokens * hidden_size // vocab_size)
    rows = 1 << (rows.bit_length() - 1)  # round down to a power of two: tensor-core friendly, never larger
    return max(1, min(max(rows, MIN_CHUNK_TOKENS), n_tokens))


def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Forward computes the loss and all needed gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias=None, ignore_index=-100, softcap=None, chunk_size=None,
                reduction="mean", grad_enabled=True):
        hidden_shape, hidden_dtype = hidden.shape, hidden.dtype
        h_all = hidden.reshape(-1, hidden.shape[-1])
        y_all = labels.reshape(-1).contiguous()
        n_tokens, vocab = h_all.shape[0], weight.shape[0]
        # needs_input_grad ignores no_grad mode, so the caller's grad mode comes in as an argument.
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[3]
        need_grad = need_h or need_w or need_b
        chunk = chunk_size or default_chunk_size(n_tokens, h_all.shape[1], vocab)

        n_valid = (y_all != ignore_index).sum()
        scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
        if reduction == "mean":
            scale = scale / n_valid.clamp(min=1)

        dtype = _compute_dtype(hidden.device, weight)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(h_all.shape, dtype=hidden_dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None

        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_tokens, chunk):
                end = min(start + chunk, n_tokens)
                h = h_all[start:end].to(dtype)
                logits = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
                cross_entropy_rows(logits, y_all[start:end], ignore_index=ignore_index, softcap=softcap,
                                   grad_scale=scale if need_grad else None, loss=loss_rows[start:end])
                # From here on `logits` holds d loss / d logits for this chunk.
                if need_h and hidden_dtype == dtype:
                    torch.mm(logits, w, out=grad_h[start:end])
                elif need_h:
                    grad_h[start:end] = logits @ w
                if need_w:
                    grad_w.addmm_(logits.t(), h)
                if need_b:
                    grad_b += logits.sum(dim=0, dtype=torch.float32)

        ctx.save_for_backward(
            grad_h.view(hidden_shape) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        ctx.backward_done = False
        return loss_rows.sum() * scale[0]

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_done:
            raise RuntimeError("fused_linear_cross_entropy stores its gradients during forward and can be "
                               "backpropagated once; recompute the loss for a second backward pass")
        ctx.backward_done = True
        # The gradients were made for grad_output == 1; scaling in place keeps no second copy.
        grads = [g.mul_(grad_output.to(g.dtype)) if g is not None else None for g in ctx.saved_tensors]
        return grads[0], grads[1], None, grads[2], None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden [..., H] @ weight[V, H].T (+ bias[V])`` against already-shifted ``labels [...]``.

    Never materialises the ``[N, V]`` logits: see the module docstring for chunking and conventions.
    Returns a float32 scalar.
    """
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ConfigError(f"labels of shape {tuple(labels.shape)} do not match hidden states of shape "
                          f"{tuple(hidden.shape)}; pass labels already shifted, one per token")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ConfigError(f"weight must be [vocab, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ConfigError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size <= 0:
        raise ConfigError(f"chunk_size must be positive, got {chunk_size}")
    if softcap is not None and not softcap > 0:
        raise ConfigError(f"softcap must be positive or None, got {softcap}")
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, labels, bias, ignore_index, softcap, chunk_size,
                                                 reduction, torch.is_grad_enabled())


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Eager lm_head followed by the plain-torch cross-entropy (materialises the full logits)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy_reference(logits, labels, ignore_index=ignore_index, softcap=softcap, reduction=reduction)
