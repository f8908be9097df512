"""`generate`: greedy or sampled decoding through `DecodeGraph`, with transformers' `generate` as the fallback.

`graphed_generate(model, input_ids, ...)` takes the arguments most notebook calls use (max_new_tokens,
min_new_tokens, do_sample, temperature, top_k, top_p, eos/pad token ids) and returns what transformers'
`generate` returns for them: the prompt followed by the new tokens, finished rows padded. `supports(kwargs)`
says whether a `generate(**kwargs)` call can take this path; `FastLanguageModel.for_inference(model)` routes the
calls that can to it (unless cuda_graphs=False) and leaves the others (beam search, streamers, logits
processors, ...) to transformers.

One `DecodeGraph` is kept per (batch size, cache length rounded up to 256), the four most recently used, so a
notebook that generates repeatedly captures once.
"""

from __future__ import annotations

import warnings

import torch

from ..models.unwrap import base_model_of
from .decode import DecodeGraph

BUCKET = 256
KEEP = 4  # decode graphs kept per model (batch size x cache length)
# generate() keyword arguments this path honours; any other (with a non-default value) goes to transformers.
HANDLED = {"input_ids", "attention_mask", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k",
           "top_p", "eos_token_id", "pad_token_id", "use_cache"}


def supports(model, kwargs: dict) -> bool:
    """Whether `model.generate(**kwargs)` can run on the graphed path."""
    if set(kwargs) - HANDLED or kwargs.get("use_cache") is False:
        return False
    ids, new = kwargs.get("input_ids"), kwargs.get("max_new_tokens")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not isinstance(new, int) or new < 1:
        return False
    if not _plain_config(getattr(model, "generation_config", None)):
        return False
    window = _window(model)
    # One mask serves every layer: sliding-window layers would need their own once the window is exceeded.
    return not window or ids.shape[1] + kwargs["max_new_tokens"] <= window


# generation-config entries this path honours or that change nothing it does; the config's other settings
# (repetition penalty, beams, forced tokens, ...) make transformers decode differently, so such models go there.
_CONFIG_NEUTRAL = {"pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "do_sample",
                   "temperature", "top_k", "top_p", "max_length", "max_new_tokens", "use_cache",
                   "cache_implementation", "_from_model_config", "transformers_version"}
_CONFIG_OFF = {"output_attentions", "output_hidden_states", "output_scores", "output_logits",
               "return_dict_in_generate", "min_new_tokens", "min_length"}  # neutral while unset or false


# settings at the value that changes nothing (configs often spell these out)
_CONFIG_IDENTITY = {"repetition_penalty": 1.0, "length_penalty": 1.0, "num_beams": 1, "num_beam_groups": 1,
                    "num_return_sequences": 1, "no_repeat_ngram_size": 0, "typical_p": 1.0, "diversity_penalty": 0.0,
                    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0}


def _plain_config(config) -> bool:
    if config is None:
        return True
    for key, value in config.to_diff_dict().items():
        neutral = (key in _CONFIG_NEUTRAL or (key in _CONFIG_OFF and not value)
                   or (key in _CONFIG_IDENTITY and value == _CONFIG_IDENTITY[key]))
        if not neutral:
            return False
    return True


def _window(model) -> int | None:
    return getattr(base_model_of(model).config, "sliding_window", None)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _decoder(model, batch: int, length: int, graphs: bool) -> DecodeGraph:
    max_len = -(-length // BUCKET) * BUCKET
    window = _window(model)
    if window:  # sliding-window layers keep a cache of at most the window: every layer the same length
        max_len = min(max_len, window)
    pool = model.__dict__.setdefault("_slothbook_decode_graphs", {})
    key = (batch, max_len, graphs)
    if key in pool:
        pool[key] = pool.pop(key)  # most recently used last
    else:
        while len(pool) >= KEEP:  # each holds a static cache and the graph's memory: drop the least recent
            pool.pop(next(iter(pool)))
        try:
            pool[key] = DecodeGraph(model, batch, max_len, _device(model), graphs=graphs)
        except Exception as exc:  # a step that cannot be captured still decodes, eagerly
            if not graphs:
                raise
            warnings.warn(f"slothbook: the decode step could not be captured in a CUDA graph ({type(exc).__name__}: "
                          f"{exc}); decoding eagerly over the static cache instead.", stacklevel=3)
            pool[key] = DecodeGraph(model, batch, max_len, _device(model), graphs=False)
    return pool[key]


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


@torch.inference_mode()
def graphed_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, eos_token_id=None, pad_token_id=None,
                     graphs: bool = True, generator: torch.Generator | None = None, **_) -> torch.Tensor:
    """The prompt and up to `max_new_tokens` new tokens per row ([batch, prompt + new]), as `generate` gives.

    eos/pad ids default to the model's generation config. A row stops at its EOS (later positions get the pad
    id); decoding stops when every row has stopped.
    """
    gen_config = getattr(model, "generation_config", None)
    eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(gen_config, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(gen_config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    device = _device(model)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    batch, length = input_ids.shape
    decoder = _decoder(model, batch, length + max_new_tokens, graphs)
    stop = torch.tensor(eos, device=input_ids.device) if eos else None
    running = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    logits = decoder.prefill(input_ids, attention_mask)
    out = []
    for i in range(max_new_tokens):
        if i < min_new_tokens and stop is not None:
            logits = logits.index_fill(-1, stop, float("-inf"))
        token = _choose(logits, do_sample, temperature, top_k, top_p, generator)
        token = torch.where(running, token, torch.full_like(token, pad))
        out.append(token)
        if stop is not None:
            running &= ~torch.isin(token, stop)
            if not bool(running.any()):  # one small read a token: the next step waits for this one anyway
                break
        if i + 1 < max_new_tokens:
            logits = decoder.step(token)
    return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)
