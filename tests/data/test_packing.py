"""pack() and packed_attention_mask: rows hold whole sequences, and the real model sees each one as if alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slothbook.data import PackedCollator, pack, packed_attention_mask
from slothbook.data.packing import sequence_ids
from slothbook.errors import ConfigError


def test_rows_keep_every_sequence_whole():
    sequences = [list(range(100 + i, 100 + i + n)) for i, n in enumerate([7, 3, 9, 2, 5, 8, 1, 4])]
    rows = pack(sequences, max_seq_length=10)
    assert all(len(r) <= 10 for r in rows["input_ids"])
    assert len(rows) == 4  # 39 tokens: best fit needs the minimum of ceil(39/10) rows
    found = []
    for ids, labels, positions in zip(rows["input_ids"], rows["labels"], rows["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            found.append(ids[a:b])
            assert positions[a:b] == list(range(b - a))
            assert labels[a] == -100 and labels[a + 1:b] == ids[a + 1:b]
    assert sorted(found) == sorted(sequences)


def test_given_labels_are_kept_and_long_sequences_truncated(caplog):
    rows = pack([{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6]}], max_seq_length=4)
    assert rows[0] == {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "position_ids": [0, 1, 2, 3]}
    assert "truncated" in caplog.text


def test_max_seq_length_must_hold_a_prediction():
    with pytest.raises(ConfigError):
        pack([[1, 2]], max_seq_length=1)


def test_mask_is_causal_and_block_diagonal():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    mask = packed_attention_mask(positions, torch.float32)
    assert mask.shape == (1, 1, 9, 9)
    seq = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    for q in range(9):
        for k in range(9):
            allowed = seq[q] == seq[k] and k <= q
            assert (mask[0, 0, q, k] == 0) == allowed
            assert allowed or mask[0, 0, q, k] == torch.finfo(torch.float32).min
    assert packed_attention_mask(positions, torch.bfloat16).dtype == torch.bfloat16


def test_sequence_ids_follow_position_restarts():
    assert sequence_ids(torch.tensor([[0, 1, 0, 1, 2, 0]])).tolist() == [[1, 1, 2, 2, 2, 3]]


# --- the real embedded model: a packed row must give each sequence the loss it has on its own ---

def per_token_loss(logits, labels):
    """Cross-entropy of each position predicting the next label (-100: no loss), like HF's shifted loss."""
    return F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="none")


@pytest.fixture(scope="module")
def sequences(embedded_tokenizer):
    texts = ["The capital of France is Paris.", "Reverse the word: garden -> nedrag",
             "12 + 30 = 42, and 7 * 6 = 42 as well.", "Monday comes before Tuesday."]
    return [embedded_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def separate_losses(model, sequences):
    losses = []
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            losses.append(per_token_loss(model(input_ids=x).logits, x))
    return losses


def packed_losses(model, sequences, with_mask: bool, with_positions: bool = True):
    batch = PackedCollator(attention_mask=with_mask)([{"input_ids": ids} for ids in sequences])
    assert batch["input_ids"].shape == (1, sum(map(len, sequences)))
    if not with_positions:
        del batch["position_ids"]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    losses, start = [], 0
    for ids in sequences:
        segment = slice(start, start + len(ids))
        losses.append(per_token_loss(logits[:, segment], batch["input_ids"][:, segment]))
        start += len(ids)
    # The collator's labels stop the last token of one sequence from predicting the first of the next.
    flat = per_token_loss(logits, batch["labels"])
    assert int((flat != 0).sum()) == sum(len(ids) - 1 for ids in sequences)
    return losses


@pytest.mark.parametrize("with_mask", [False, True], ids=["position_ids", "packed_attention_mask"])
def test_packed_loss_equals_separate_loss(with_mask, model, sequences, separate_losses):
    for packed, alone in zip(packed_losses(model, sequences, with_mask), separate_losses):
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.mean(), alone.mean(), atol=1e-5, rtol=0)


def test_without_boundaries_attention_leaks(model, sequences, separate_losses):
    """The control: one plain causal row (no position restarts, no mask) changes every later sequence's loss."""
    leaked = packed_losses(model, sequences, with_mask=False, with_positions=False)
    assert all((a.mean() - b.mean()).abs() > 1e-3 for a, b in zip(leaked[1:], separate_losses[1:]))


def _gpu_attention():
    import importlib.util

    return ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.gpu
@pytest.mark.parametrize("attn", _gpu_attention())
def test_packed_loss_on_the_gpu(attn, train_model_name, sequences):
    """On CUDA: SDPA in fp32 (tight), flash-attention's varlen path through position_ids in bf16 (bf16 rounding)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if attn == "sdpa" else torch.bfloat16
    from slothbook.models.loader import resolve_source

    gpu = AutoModelForCausalLM.from_pretrained(resolve_source(train_model_name), dtype=dtype,
                                               attn_implementation=attn).cuda().eval()
    batch = PackedCollator()([{"input_ids": ids} for ids in sequences])
    with torch.no_grad():
        logits = gpu(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}).logits
        start, tolerance = 0, 1e-4 if dtype == torch.float32 else 3e-2
        for ids in sequences:
            alone = per_token_loss(gpu(input_ids=torch.tensor([ids]).cuda()).logits, torch.tensor([ids]).cuda())
            packed = per_token_loss(logits[:, start:start + len(ids)], torch.tensor([ids]).cuda())
            assert abs(packed.mean().item() - alone.mean().item()) < tolerance
            start += len(ids)
