"""The bundled demo dataset: small, reproducible, rendered like the embedded model's template, and trainable."""

from __future__ import annotations

import json

import torch

from slothbook.data import PaddingCollator, demo_dataset_path, load_dataset_file, train_on_responses_only
from slothbook.data.formats import alpaca_to_messages
from slothbook.data.make_demo import make_examples, write


def rows():
    return [json.loads(line) for line in demo_dataset_path().read_text().splitlines()]


def test_file_is_small_and_complete():
    path = demo_dataset_path()
    assert path.stat().st_size < 200_000
    data = rows()
    assert 300 <= len(data) <= 500
    assert all(set(r) == {"instruction", "input", "output", "text"} and r["instruction"] and r["output"] for r in data)
    assert len({(r["instruction"], r["input"]) for r in data}) == len(data)


def test_generator_reproduces_the_file(tmp_path):
    assert write(tmp_path / "demo.jsonl").read_bytes() == demo_dataset_path().read_bytes()
    assert make_examples(5) == rows()[:5]


def test_text_is_the_embedded_models_chat_rendering(tokenizer):
    for row in rows()[:50]:
        messages = alpaca_to_messages(row["instruction"], row["input"], row["output"])
        assert row["text"] == tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")


def test_examples_fit_in_128_tokens(tokenizer):
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in rows()])["input_ids"]]
    assert max(lengths) <= 128


def top_layers(model, first: int):
    """A copy of the model that starts at decoder layer `first` and takes that layer's input as inputs_embeds."""
    import copy

    top = copy.deepcopy(model)
    top.model.layers = top.model.layers[first:]
    top.config.num_hidden_layers = len(top.model.layers)
    return top


def assistant_loss(causal_lm, hidden, attention_mask, labels):
    """Mean next-token cross-entropy over the learned (assistant) positions, the loss HF computes from labels,
    with the vocabulary projection run only where a label is learned (most positions are masked prompt)."""
    out = causal_lm.model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(out[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def test_response_only_training_lowers_the_assistant_loss(model, tokenizer):
    """20 steps of LoRA on the top three layers, four demo examples: the loss on assistant tokens falls.

    The 27 frozen layers below the adapters cannot change, so their output is computed once and the loop runs
    only the top three layers (the same loss as the whole model, checked before training).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    data = train_on_responses_only(load_dataset_file(demo_dataset_path()).select(range(4)), tokenizer)
    batch = PaddingCollator(tokenizer.pad_token_id)(list(data))
    learned = batch["labels"] != -100
    assert 0 < learned.sum() < batch["attention_mask"].sum() / 2  # most tokens are prompt: masked
    first = model.config.num_hidden_layers - 3
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True, use_cache=False)
    hidden, mask, labels = full.hidden_states[first], batch["attention_mask"], batch["labels"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    top = get_peft_model(top_layers(model, first), config)
    causal_lm = top.get_base_model()
    with torch.no_grad():
        before = assistant_loss(causal_lm, hidden, mask, labels).item()
    assert abs(before - full.loss.item()) < 1e-4
    optimizer = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(20):
        assistant_loss(causal_lm, hidden, mask, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = assistant_loss(causal_lm, hidden, mask, labels).item()
    assert after < 0.5 * before, (before, after)
