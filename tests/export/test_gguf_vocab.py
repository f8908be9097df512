"""The GGUF tokenizer: llama.cpp must split text into exactly the token ids the Hugging Face tokenizer gives.

Each case builds a real tokenizer (trained in a fraction of a second), exports a tiny model with it and
tokenizes with llama.cpp's vocabulary (vocab_only load).
"""

from __future__ import annotations

import json

import pytest

from slothbook.errors import ExportError
from slothbook.export import save_pretrained_gguf
from slothbook.export.gguf_vocab import _SPLIT_PATTERNS, bpe_pre_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it? I'll say we've done 3.14159 laps.",
    "Bonjour le monde, ça va très bien ! Déjà vu.",
    "日本語のテキストです。中文也可以。",
    "Привет мир, как дела? Всё хорошо.",
    "def f(x):\n    return x**2  # squares\n\n\tindented\twith tabs",
] * 30
TEXT = ("It's 2024-06-01: I'LL pay $1234567.89 for 3 naïve cafés! 日本語 Привет\n\n  spaces\t\ttabs "
        "<|im_start|>user\nhi<|im_end|>")


def gguf_tokenize(tokenizer, model_type, folder, text=TEXT):
    from transformers import AutoModelForCausalLM

    from slothbook.models.families.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=len(tokenizer)))
    path = save_pretrained_gguf(model, folder, tokenizer, "f16")[0]
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()


def byte_level_tokenizer(pre_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def _split_then_bytes(pattern):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _pre_tokenizers():
    from tokenizers import pre_tokenizers

    return {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": _split_then_bytes(_SPLIT_PATTERNS["llama-bpe"]),
        "qwen2": _split_then_bytes(_SPLIT_PATTERNS["qwen2"]),
    }


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers(name, tmp_path):
    tokenizer = byte_level_tokenizer(_pre_tokenizers()[name])
    assert bpe_pre_tokenizer(json.loads(tokenizer.backend_tokenizer.to_str())) == name
    assert gguf_tokenize(tokenizer, "qwen2", tmp_path) == tokenizer(TEXT, add_special_tokens=False)["input_ids"]


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = byte_level_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                              pre_tokenizers.ByteLevel(use_regex=False)]))
    with pytest.raises(ExportError, match="pre-tokenizer"):
        gguf_tokenize(tokenizer, "llama", tmp_path)
    assert not list(tmp_path.rglob("*.gguf"))


def sentencepiece_tokenizer(folder, tokenizer_class):
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=500,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("tokenizer_class,model_type,scores_from_file", [
    ("GemmaTokenizer", "gemma", True), ("GemmaTokenizer", "gemma", False), ("LlamaTokenizer", "llama", True),
])
def test_sentencepiece_tokenizers(tokenizer_class, model_type, scores_from_file, tmp_path):
    (tmp_path / "tok").mkdir()
    tokenizer = sentencepiece_tokenizer(tmp_path / "tok", tokenizer_class)
    if not scores_from_file:  # only tokenizer.json at hand: scores derived from the merge order
        tokenizer.vocab_file = None
    # llama.cpp puts SentencePiece's leading "▁" after every special token when the tokenizer adds one at the
    # start (Llama); transformers only at the start. Compare special-token text only where no prefix is added.
    text = TEXT.split("<|")[0] if model_type == "llama" else TEXT.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
    want = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gguf_tokenize(tokenizer, model_type, tmp_path / "gguf", text) == want
