"""Activation bytes per token of a decoder layer and of the loss head, from the model's shape alone.

One formula serves two readers: train/keep.py (how many layers' activations to keep in GPU memory) and
profiler/activations.py (the estimator). `a` is the activation dtype's size; LoRA adapters are fp32 (PEFT keeps
them so over a 16-bit base), so their inputs and intermediates are fp32 on transformers' path.

Two implementations are modelled: "kernels" (slothbook's patched forwards: fused LoRA projections and MLP,
RMSNorm and RoPE kernels, fused linear cross-entropy) and "hf" (transformers' modules with PEFT's LoRA layers and
transformers' loss). The "hf" inventories were taken tensor by tensor from saved-tensor hooks; the transient terms
were fitted to exact CPU allocation tracking (see docs/profiler.md).

Attention is modelled as SDPA's flash/efficient kernels (a log-sum-exp per head, no score matrix) unless the model
runs transformers' eager attention (Gemma-2, whose soft-capped scores SDPA cannot compute): that keeps the
[heads x context] scores of every token, so its bytes per token grow with the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "qkv_proj")  # Phi-3 fuses q, k and v in qkv_proj
GATE_UP_TARGETS = ("gate_proj", "up_proj", "gate_up_proj")  # and gate and up in gate_up_proj
MLP_TARGETS = frozenset(GATE_UP_TARGETS + ("down_proj",))
LORA_BYTES = 4  # PEFT's adapters are fp32 over a 16-bit base


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that activation memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    norms: int = 2  # RMSNorms over the hidden size per layer (Gemma-2 and -3 also norm each block's output)
    eager: bool = False  # attention materialises its scores (transformers' eager attention)
    softcap: bool = False  # the scores are soft-capped (Gemma-2): one more saved copy of them

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config, layer=None) -> Shape:
        """The shape of `config`'s model; `layer` (one of its decoder layers, meta tensors will do) is where the
        norms are counted, two without it. The attention is the config's attn_implementation, as set when the
        model was built."""
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        norms = 2 if layer is None else sum(_is_norm_over(m, text.hidden_size) for m in layer.children())
        return cls(text.num_hidden_layers, text.hidden_size, text.intermediate_size, heads,
                   getattr(text, "num_key_value_heads", None) or heads, head_dim, text.vocab_size, norms,
                   eager=getattr(text, "_attn_implementation", None) == "eager",
                   softcap=bool(getattr(text, "attn_logit_softcapping", None)))


def _is_norm_over(module, width: int) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and tuple(weight.shape) == (width,)


def _scores(s: Shape, a: int, context: int) -> int:
    """Bytes per token that eager attention saves of its [heads x context] scores: softmax's fp32 output, its cast
    back to the activation dtype (what multiplies v), and the soft-cap's tanh output."""
    if not s.eager:
        return 0
    return s.heads * context * (4 + (a if a != 4 else 0) + (a if s.softcap else 0))


def _norm(s: Shape, a: int, impl: str) -> int:
    # transformers' RMSNorm upcasts its input to fp32 and saves that copy; the kernel saves the input as is.
    # Both keep one fp32 inverse rms per token.
    return (4 if impl == "hf" else a) * s.hidden + 4


def _lora_inputs(s: Shape, a: int, targets: frozenset, impl: str, groups) -> int:
    """Inputs the LoRA A matrices of `groups` ((names, input width) pairs) keep for their gradients."""
    if impl == "hf" and a != LORA_BYTES:
        # PEFT casts the input to the adapter's fp32 in every LoRA layer: one fp32 copy per targeted module.
        return sum(LORA_BYTES * width for names, width in groups for name in names if name in targets)
    # One saved input per group, shared by its adapters. o_proj's input is the attention output, which attention
    # saves anyway.
    return sum(a * width for names, width in groups if names != ("o_proj",) and any(n in targets for n in names))


@dataclass(frozen=True)
class LayerBytes:
    """Bytes per token of one decoder layer, the MLP's part apart (a tiled MLP holds it for one chunk only)."""

    other: int
    mlp: int

    @property
    def total(self) -> int:
        return self.other + self.mlp


def layer_saved(s: Shape, a: int, r: int, targets: frozenset, impl: str = "kernels", context: int = 0) -> LayerBytes:
    """Bytes per token one decoder layer saves for backward when it is not checkpointed. `context`: the key length
    each query sees (the padded sequence length); it matters only to eager attention."""
    if s.eager:  # q, k and v with k and v repeated to the query heads, the output, the scores
        attention = a * (2 * s.q + 2 * (s.q if s.kv_heads < s.heads else s.kv)) + _scores(s, a, context)
    else:
        attention = a * (2 * s.q + 2 * s.kv) + 4 * s.heads  # q, k, v, output, log-sum-exp (flash/efficient SDPA)
    lora_mid = (LORA_BYTES if impl == "hf" else a) * r  # x A^T per adapter
    attention_lora = _lora_inputs(s, a, targets, impl, [(ATTENTION_TARGETS, s.hidden), (("o_proj",), s.q)])
    # The fused MLP recomputes act(gate) * up, down_proj's input, instead of saving it.
    mlp_groups = [(GATE_UP_TARGETS, s.hidden)] + ([(("down_proj",), s.intermediate)] if impl == "hf" else [])
    mlp_lora = _lora_inputs(s, a, targets, impl, mlp_groups)
    mlp_adapters = len(targets & MLP_TARGETS)
    # hf: gate and up outputs plus the activation's output; the fused MLP keeps gate and up and recomputes the rest.
    mlp = (3 if impl == "hf" else 2) * a * s.intermediate + mlp_lora + lora_mid * mlp_adapters
    other = s.norms * _norm(s, a, impl) + attention + attention_lora + lora_mid * (len(targets) - mlp_adapters)
    return LayerBytes(other, mlp)


def layer_transient(s: Shape, a: int, impl: str, recompute: bool) -> LayerBytes:
    """Bytes per token that one layer's backward adds on top of its saved tensors (gradients in flight).

    kernels: the fused MLP's backward peaks at dh and the recomputed h beside gate and up (2 I), with the
    incoming gradient and dx (2 H); a recomputed layer also makes its output once (H).
    hf: fitted, see below.
    """
    if impl == "kernels":
        return LayerBytes(a * (3 if recompute else 2) * s.hidden, 2 * a * s.intermediate)
    per_i, per_h = HF_TRANSIENT[(recompute, 4 if a == 4 else 2)]
    return LayerBytes(round(a * per_h * s.hidden), round(a * per_i * s.intermediate))


def attention_backward(s: Shape, a: int, flash: bool = False, context: int = 0) -> int:
    """Bytes per token that a layer's attention backward has alive beyond the layer's saved tensors.

    The gradient that reached the layer (H) and the attention output's gradient with its head-major copy (2 q);
    then SDPA's backward as cuDNN's kernels run it (torch's choice on Hopper): dq, dk and dv, an fp32 dq
    accumulator, dk and dv expanded to the query heads under grouped-query attention, and an fp32 row sum per
    head. `flash`: the flash backend (torch's choice on Ampere and Ada) holds 4 q more. With the MLP tiled this
    is where a long-context layer's backward peaks. benchmarks/attention_memory.py measured SDPA's part for
    Llama-3.1-8B's heads on an H200: cuDNN 45,184 and flash 61,568 bytes per token.
    Eager attention instead: dq, dk, dv (repeated to the query heads under grouped-query attention) and, per head
    and key position, the scores' gradient in fp32 beside one in the activation dtype (measured with the CPU's
    allocation tracker: 6 bytes in bf16, 8 in fp32), over `context` keys.
    """
    gqa = 2 * a * s.q if s.kv_heads < s.heads else 0
    if s.eager:
        return a * s.hidden + 2 * a * s.q + a * (s.q + 2 * s.kv) + gqa + s.heads * context * (4 + a)
    sdpa = a * (s.q + 2 * s.kv) + 4 * s.q + gqa + 4 * s.heads + (4 * s.q if flash else 0)
    return a * s.hidden + 2 * a * s.q + sdpa


# The "hf" backward working set, a * (c_i * intermediate + c_h * hidden) bytes per token, keyed by
# (recomputed, activation bytes). Least-squares fits to exact CPU allocation tracking of Llama-shaped layers
# (hidden 576/1152, intermediate 1536/3072, 1024 tokens, LoRA r=16 on all projections); the fp32 and bf16 cases
# differ because PEFT's fp32 adapter path adds fp32 copies and gradients to a bf16 layer.
HF_TRANSIENT = {
    (True, 4): (2.012, 0.007),
    (True, 2): (1.993, 5.982),
    (False, 4): (1.199, 1.459),
    (False, 2): (0.259, 6.073),
}


def default_ce_chunk(n_tokens: int, hidden: int, vocab: int) -> int:
    from slothbook.kernels.fused_linear_cross_entropy import default_chunk_size

    return min(n_tokens, default_chunk_size(n_tokens, hidden, vocab))


@dataclass(frozen=True)
class HeadBytes:
    """The loss head's bytes over a whole step (not per token)."""

    held: int  # kept from forward to backward (the returned logits included)
    peak: int  # its working set at the start of backward


def head_bytes(s: Shape, a: int, n_tokens: int, impl: str = "kernels") -> HeadBytes:
    """The head (final norm, logits, loss) over `n_tokens` tokens."""
    if impl == "hf":
        # Final norm (fp32 copy of its input), the logits the model returns (a), their fp32 log-softmax (4),
        # the shifted labels (int64). In backward: log-softmax, its gradient and the logits' gradient, all fp32.
        held = 4 * s.hidden + 4 + a * s.vocab + 4 * s.vocab + 8
        return HeadBytes(n_tokens * held, n_tokens * (4 * s.hidden + 4 + 12 * s.vocab + 8))
    # Final norm input, the hidden-state gradient the fused loss computes in forward; one chunk of logits.
    held = 2 * a * s.hidden + 4
    chunk = default_ce_chunk(n_tokens, s.hidden, s.vocab)
    return HeadBytes(n_tokens * held, n_tokens * (held + 4) + chunk * s.vocab * a)
