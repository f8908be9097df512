"""train_on_responses_only masks exactly the non-assistant tokens, for every template and every input form."""

from __future__ import annotations

import datasets
import pytest

from slothbook.data import TEMPLATES, demo_dataset_path, get_chat_template, load_dataset_file, train_on_responses_only
from slothbook.errors import DatasetError

# The text each family closes a reply with; it is learned with the reply (the model must learn to stop).
REPLY_END = {
    "chatml": "<|im_end|>\n", "qwen-2.5": "<|im_end|>\n", "llama-3": "<|eot_id|>", "llama-2": " </s>",
    "mistral": "</s>", "gemma": "<end_of_turn>\n", "phi-3": "<|end|>\n", "zephyr": "</s>\n", "vicuna": "</s>",
    "alpaca": "<|im_end|>",  # the tokenizer's own eos
}


def replies(conversation):
    return [m["content"] for m in conversation if m["role"] == "assistant"]


def test_every_template_has_a_reply_end():
    assert set(REPLY_END) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_only_assistant_tokens_are_learned(name, tokenizer, conversation, learned_runs):
    get_chat_template(tokenizer, name)
    three_exchanges = conversation + [{"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]
    out = train_on_responses_only(datasets.Dataset.from_list([{"messages": three_exchanges}]), tokenizer)
    row = out[0]
    assert set(out.column_names) == {"input_ids", "attention_mask", "labels"}
    # The tokens are those of the whole rendered conversation: masking does not change the tokenization.
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(three_exchanges, tokenize=False)
    runs = learned_runs(tokenizer, row["input_ids"], row["labels"])
    assert [r.strip() for r in runs] == [(reply + REPLY_END[name]).strip() for reply in replies(three_exchanges)]


def test_default_template_of_the_tokenizer(tokenizer, conversation, learned_runs):
    out = train_on_responses_only(datasets.Dataset.from_list([{"messages": conversation[1:]}]), tokenizer)
    runs = learned_runs(tokenizer, out[0]["input_ids"], out[0]["labels"])
    assert runs == ["Hello!\n\nHow can I help?<|im_end|>\n", "4<|im_end|>\n"]


def test_demo_text_rows_and_alpaca_rows_agree(tokenizer, learned_runs):
    demo = load_dataset_file(demo_dataset_path()).select(range(8))
    from_text = train_on_responses_only(demo.select_columns(["text"]), tokenizer)
    from_alpaca = train_on_responses_only(demo.remove_columns(["text"]), tokenizer)
    for a, b, output in zip(from_text, from_alpaca, demo["output"]):
        assert learned_runs(tokenizer, a["input_ids"], a["labels"]) == [output + "<|im_end|>"]
        # The alpaca rows render with the trailing newline the text field leaves out; the labels agree before it.
        assert b["labels"][: len(a["labels"])] == a["labels"]


def test_tokenized_rows_are_masked(tokenizer, conversation, learned_runs):
    ids = tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]
    out = train_on_responses_only(datasets.Dataset.from_dict({"input_ids": [ids]}), tokenizer)
    assert out[0]["input_ids"] == ids
    assert learned_runs(tokenizer, ids, out[0]["labels"]) == ["Hello!\n\nHow can I help?<|im_end|>\n",
                                                             "4<|im_end|>\n"]


def test_conversation_without_reply_names_the_row(tokenizer, conversation):
    rows = [{"messages": conversation}, {"messages": conversation[:2]}]
    with pytest.raises(DatasetError, match=r"Row 1 has no assistant turn \(roles \['system', 'user'\]\)"):
        train_on_responses_only(datasets.Dataset.from_list(rows), tokenizer)


def test_text_without_reply_names_the_row(tokenizer):
    rows = [{"text": "<|im_start|>user\nhello<|im_end|>\n"}]
    with pytest.raises(DatasetError, match="Row 0 has no assistant turn"):
        train_on_responses_only(datasets.Dataset.from_list(rows), tokenizer)


def test_max_length_truncates_and_drops_rows_left_without_reply(tokenizer, conversation):
    rows = [{"messages": conversation}, {"messages": [{"role": "user", "content": "word " * 200},
                                                      {"role": "assistant", "content": "ok"}]}]
    out = train_on_responses_only(datasets.Dataset.from_list(rows), tokenizer, max_length=64)
    assert len(out) == 1 and len(out[0]["input_ids"]) <= 64


def lora(model, layers=(28, 29)):
    """A copy of the session model with small LoRA adapters on its top layers (cheap steps on the CPU)."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=list(layers))
    return get_peft_model(copy.deepcopy(model), config)


def sft_trainer(model, tokenizer, tmp_path, **config):
    from trl import SFTConfig, SFTTrainer

    demo = load_dataset_file(demo_dataset_path()).select(range(4))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-4,
                     max_length=128, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                     gradient_checkpointing=False, **config)
    return SFTTrainer(model=lora(model), args=args, train_dataset=demo.select_columns(["text"]),
                      processing_class=tokenizer)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_learns_replies_only(packing, model, tokenizer, tmp_path, learned_runs):
    trainer = train_on_responses_only(sft_trainer(model, tokenizer, tmp_path, packing=packing))
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("position_ids" in batch) == packing and ("attention_mask" in batch) != packing
    runs = [r for ids, labels in zip(batch["input_ids"], batch["labels"]) for r in learned_runs(tokenizer, ids, labels)]
    outputs = set(load_dataset_file(demo_dataset_path()).select(range(4))["output"])
    assert runs and all(r.endswith("<|im_end|>") and r[: -len("<|im_end|>")] in outputs for r in runs)
    result = trainer.train()
    assert 0 < result.training_loss < 10


def test_tokenizer_without_offsets_masks_piecewise(tokenizer, conversation, learned_runs):
    """Tokenizers without offset mappings (slow ones) are encoded piece by piece at the reply edges."""
    fast = train_on_responses_only(datasets.Dataset.from_list([{"messages": conversation}]), tokenizer)[0]
    tokenizer.__class__ = type("SlowTokenizer", (type(tokenizer),), {"is_fast": False})
    slow = train_on_responses_only(datasets.Dataset.from_list([{"messages": conversation}]), tokenizer)[0]
    # ChatML replies start and end at special tokens, so the pieces tokenize exactly as the whole text does.
    assert slow == fast
