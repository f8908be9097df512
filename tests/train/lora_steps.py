"""One training step's loss and LoRA gradients, for the tests that compare checkpointing modes."""

from __future__ import annotations


def lora_grads(model, ids):
    """(loss, {name: gradient}) of one forward and backward over `ids` as inputs and labels."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
