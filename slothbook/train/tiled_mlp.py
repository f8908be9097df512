"""Run each decoder layer's MLP over the sequence in chunks, so its activations scale with the chunk.

A long-context step is dominated by the MLP's intermediate tensors (tokens x intermediate size, several of
them). `enable_tiled_mlp` runs the MLP chunk by chunk without keeping activations, then in backward
recomputes it chunk by chunk, so at most one chunk's intermediates exist at a time; parameter gradients are
summed over the chunks. The MLP acts on each token separately, so the result is the untiled one up to
float summation order.

Tiling costs a third MLP forward per layer (checkpointing already recomputes the layer once), so the checkpointing
modes switch it on only where it buys memory that matters: above TILED_MLP_ABOVE tokens per step. A layer that
keeps its activations (use_gradient_checkpointing="auto") is never tiled.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..forwards import inner_forward, patch_forward, reads_inner, unpatch_forward
from .offload import ReplayState, find_decoder_layers, grads_of, in_kept_layer

_PATCH_KEY = "_slothbook_tiled_mlp"
TILED_MLP_CHUNK = 4096  # tokens per chunk
# Tokens per step above which set_gradient_checkpointing's offloading modes tile. At 16K tokens an 8B model's
# untiled MLP working set (gate, up, their gradients: 4 x tokens x 14336 x 2 bytes) is under 2 GiB.
TILED_MLP_ABOVE = 16384


def _chunked(forward, rows: int, flat: torch.Tensor) -> torch.Tensor:
    """forward(flat) computed `rows` tokens at a time into one output tensor."""
    out = None
    for start in range(0, flat.shape[0], rows):
        y = forward(flat[start:start + rows])
        if out is None:
            out = y.new_empty(flat.shape[0], *y.shape[1:])
        out[start:start + rows] = y
    return out


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward, rows, x, *params):
        ctx.forward, ctx.rows, ctx.params = forward, rows, params
        ctx.replay = ReplayState(x.device)  # dropout masks repeat chunk by chunk in the recompute
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        return _chunked(forward, rows, flat).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        forward, rows, params = ctx.forward, ctx.rows, ctx.params
        need_x, need_params = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        wanted = [p for p, need in zip(params, need_params) if need]
        flat, grad_flat = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if need_x else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        with ctx.replay.replay():
            for start in range(0, flat.shape[0], rows):
                chunk = flat[start:start + rows].detach().requires_grad_(need_x)
                got = grads_of(forward(chunk), (grad_flat[start:start + rows],),
                               ([chunk] if need_x else []) + wanted)
                if need_x:
                    grad_x[start:start + rows] = got.pop(0)
                sums = [s if g is None else g if s is None else s.add_(g) for s, g in zip(sums, got)]
        grads = iter(sums)
        return (None, None, grad_x.view_as(x) if need_x else None,
                *(next(grads) if need else None for need in need_params))


def _tiled_forward(mlp: nn.Module, chunk_tokens: int, above: int):
    @reads_inner  # the forward beneath is looked up per call: kernels patched in later run inside the tiling
    def tiled(x):
        forward = inner_forward(mlp, _PATCH_KEY)
        tokens = x.numel() // x.shape[-1]
        if tokens <= max(chunk_tokens, above) or in_kept_layer():
            return forward(x)  # short inputs (and every decoding step) run untouched
        if not torch.is_grad_enabled():  # chunks still bound the intermediates, nothing to recompute
            return _chunked(forward, chunk_tokens, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        params = [p for p in mlp.parameters() if p.requires_grad]
        return _TiledMLP.apply(forward, chunk_tokens, x, *params)

    return tiled


def _mlp_of(layer: nn.Module) -> nn.Module | None:
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    # Mixture-of-experts blocks also return router logits for an auxiliary loss: left as they are.
    if mlp is None or hasattr(mlp, "experts"):
        return None
    return mlp


def enable_tiled_mlp(model: nn.Module, chunk_tokens: int = TILED_MLP_CHUNK, above: int = 0) -> int:
    """Make every decoder layer's dense MLP run `chunk_tokens` tokens at a time (batch x sequence flattened).

    Inputs of at most max(chunk_tokens, above) tokens are not touched, nor the MLPs of layers that keep their
    activations ("auto" checkpointing). Returns how many MLPs were tiled.
    """
    if chunk_tokens < 1:
        raise ConfigError(f"chunk_tokens must be a positive number of tokens, got {chunk_tokens}")
    if above < 0:
        raise ConfigError(f"above must be a number of tokens >= 0, got {above}")
    tiled = 0
    for layer in find_decoder_layers(model):
        mlp = _mlp_of(layer)
        if mlp is not None:
            unpatch_forward(mlp, _PATCH_KEY)  # so that mlp.forward below is the MLP's own
            patch_forward(mlp, _PATCH_KEY, _tiled_forward(mlp, chunk_tokens, above))
            tiled += 1
    return tiled


def disable_tiled_mlp(model: nn.Module) -> None:
    """Restore the MLPs' own forwards."""
    for layer in find_decoder_layers(model):
        mlp = _mlp_of(layer)
        if mlp is not None:
            unpatch_forward(mlp, _PATCH_KEY)
