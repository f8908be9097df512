"""Streaming: the merged and GGUF exports of the 135M model never hold the whole merged model in host memory.

Each export runs in a fresh Python process (an allocator that already grew in this test session would hide the
peak) that loads the fine-tuned model, reads every weight once (they are memory-mapped and would otherwise page in
during the export), then samples its resident memory every millisecond while exporting. As a
yardstick the same probe builds the whole merged state dict, which a non-streaming export would hold. `pytest -s`
prints the numbers quoted in docs/export.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import gc, json, sys, threading, time
import psutil, torch
from peft import PeftModel
from slothbook import FastLanguageModel
from slothbook.export import save_pretrained_gguf, save_pretrained_merged
from slothbook.export.tensors import merged_tensors

mode, adapter, out = sys.argv[1:4]
torch.set_num_threads(1)
model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=256)
model = PeftModel.from_pretrained(model, adapter)
size = sum(t.numel * 4 for t in merged_tensors(model))
# Weights loaded from safetensors are memory-mapped: read them all first, or the export's first reads would
# count as "extra" memory when they only page in the model itself.
with torch.no_grad():
    checksum = sum(float(p.float().sum()) for p in model.parameters())
gc.collect()
proc = psutil.Process()
base = peak = proc.memory_info().rss
done = threading.Event()

def sample():
    global peak
    while not done.is_set():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.001)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
if mode == "merged_16bit":
    save_pretrained_merged(model, out, tokenizer, max_shard_size="50MB")
elif mode == "gguf_f16":
    save_pretrained_gguf(model, out, tokenizer, "f16")
else:  # the yardstick: what a non-streaming export holds, the whole merged state dict
    state = {t.name: t.load().clone() for t in merged_tensors(model)}
done.set()
thread.join()
peak = max(peak, proc.memory_info().rss)
print(json.dumps({"model_mib": size / 2**20, "extra_mib": (peak - base) / 2**20}))
"""


@pytest.fixture(scope="module")
def adapter_dir(finetuned, tmp_path_factory):
    from slothbook.export import save_pretrained_merged

    return save_pretrained_merged(finetuned.model, tmp_path_factory.mktemp("mem") / "lora", finetuned.tokenizer,
                                  save_method="lora")


def peak_extra(mode: str, adapter, out) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, mode, str(adapter), str(out)], capture_output=True,
                            text=True, timeout=600, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\n{mode}: merged model {numbers['model_mib']:.0f} MiB (fp32), peak extra host memory "
          f"{numbers['extra_mib']:.0f} MiB")
    return numbers


def test_exports_stream_one_tensor_at_a_time(adapter_dir, tmp_path):
    whole = peak_extra("whole_state_dict", adapter_dir, tmp_path / "whole")
    # The measurement sees a non-streaming export: the yardstick costs about the model's size.
    assert whole["extra_mib"] > 0.8 * whole["model_mib"]
    # "One layer plus one output shard": the largest tensor (the 49152 x 576 embedding, 108 MiB in fp32) plus
    # one 50 MB shard (48 MiB) plus 32 MiB for the interpreter's own churn; the model is 513 MiB.
    bound = 108 + 48 + 32
    for mode in ("merged_16bit", "gguf_f16"):
        ours = peak_extra(mode, adapter_dir, tmp_path / mode)
        assert ours["extra_mib"] < bound
