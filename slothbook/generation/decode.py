"""Decoding over a static KV cache, each step replayed from one CUDA graph.

A decode step of an 8B model is thousands of small kernels; launched one by one from Python it is bound by the
host (docs/benchmarks.md: about 100 ms a token on the lent GPUs, against a few ms of memory traffic). With a
static cache every buffer of the step has a fixed address and shape, so the step is captured once per batch
size and cache length and replayed as one launch.

`DecodeGraph` holds the fixed buffers: the token ids, position ids, the cache position and a 4D additive mask
(batch x 1 x 1 x cache length) whose columns open as the cache fills; transformers passes a 4D mask through as
given, so no mask is built inside the step. The step itself opens the current column, runs the model and
advances the positions, all on the device. On the CPU, or with `graphs=False`, the same step runs eagerly
(this is what the CPU tests compare against transformers' `generate`).
"""

from __future__ import annotations

import inspect

import torch

from ..models.unwrap import base_model_of, compute_dtype


def _cache_argument(model) -> str:
    """The name the model's forward takes the KV cache under (transformers 5.24 renamed it)."""
    return "cache" if "cache" in inspect.signature(base_model_of(model).model.forward).parameters else "past_key_values"


class DecodeGraph:
    """One batch size and cache length: prefill eagerly, then decode steps from a captured graph."""

    def __init__(self, model, batch: int, max_len: int, device: torch.device, graphs: bool = True):
        self.model, self.batch, self.max_len, self.device = model, batch, max_len, device
        from transformers import StaticCache  # on use: importing slothbook must not import transformers

        self.cache = StaticCache(config=base_model_of(model).config, max_cache_len=max_len)
        self.cache_name = _cache_argument(model)
        dtype = compute_dtype(model)
        self.masked = torch.finfo(dtype).min  # not -inf: a fully masked (padding) row stays finite
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.full((batch, 1, 1, max_len), self.masked, dtype=dtype, device=device)
        self.logits: torch.Tensor | None = None
        self.graph = None
        if graphs and device.type == "cuda":
            self._capture()

    def _run(self, ids, mask, position, cache_position):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, cache_position=cache_position,
                         use_cache=True, logits_to_keep=1, **{self.cache_name: self.cache})
        return out.logits[:, -1]

    def _step(self) -> torch.Tensor:
        self.mask.index_fill_(3, self.cache_position, 0.0)
        logits = self._run(self.ids, self.mask, self.position, self.cache_position)
        self.cache_position.add_(1)
        self.position.add_(1)
        return logits

    def _capture(self) -> None:
        # Warm-up on a side stream first (lazy cache allocation, kernel autotuning, cuBLAS handles), as CUDA
        # graphs require; what the warm-up and capture write is cleared by `reset` before every use.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def reset(self) -> None:
        self.cache.reset()  # zeroes keys, values and the cache's own length in place: captured addresses stay
        self.mask.fill_(self.masked)
        self.cache_position.zero_()
        self.position.zero_()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt (left-padded, [batch, P]) into the cache; returns the last position's logits."""
        self.reset()
        batch, length = input_ids.shape
        valid = torch.zeros(batch, self.max_len, dtype=torch.bool, device=self.device)
        valid[:, :length] = attention_mask.bool()
        causal = torch.ones(length, self.max_len, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None, None] & valid[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=self.mask.dtype, device=self.device)
        mask.masked_fill_(~allowed, self.masked)
        position = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self._run(input_ids, mask, position, torch.arange(length, device=self.device))
        # Decode state: the prompt's real tokens stay open, each step opens its own column.
        self.mask.masked_fill_(valid[:, None, None, :], 0.0)
        self.position.copy_(attention_mask.long().sum(-1, keepdim=True))
        self.cache_position.fill_(length)
        return logits

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([batch]); returns the next logits ([batch, vocab])."""
        self.ids.copy_(ids[:, None])
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits
