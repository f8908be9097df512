"""The memory figure: its traces carry the steps; the live FigureWidget builds and redraws in a real kernel."""

from __future__ import annotations

import json
import sys

import pytest

from slothbook.profiler import MemoryProfiler
from slothbook.profiler.samples import DEVICE_CATEGORIES

GIB = 2**30


def test_static_figure_stacks_categories_with_peak_and_ceiling(model16, adamw, run_steps):
    opt = adamw(model16)
    with MemoryProfiler(model16, opt) as prof:
        run_steps(model16, opt, steps=3, profiler=prof)
    fig = prof.figure()
    names = [t.name for t in fig.data]
    assert names[:6] == ["base weights", "LoRA weights", "gradients", "optimizer state", "activations",
                         "rest of the process"]
    steps = prof.steps
    for trace, cat in zip(fig.data, DEVICE_CATEGORIES):
        assert list(trace.x) == [1, 2, 3] and trace.stackgroup == "memory"
        assert list(trace.y) == [getattr(s, cat) / GIB for s in steps]
    peak, ceiling, offloaded, loss, rate = fig.data[6:]
    assert list(peak.y) == [s.peak / GIB for s in steps]
    assert list(ceiling.y) == [s.capacity / GIB for s in steps]
    assert list(loss.y) == [s.loss for s in steps] and all(v > 0 for v in rate.y)
    assert (loss.xaxis, rate.xaxis) != ("x", "x")  # loss and tokens/s sit in their own subplots


def _kernel_manager(tmp_path):
    """A kernel running this interpreter (the venv's), whatever kernelspecs the machine has."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec = tmp_path / "kernels" / "slothbook-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "slothbook", "language": "python"}))
    return KernelManager(kernel_name="slothbook-test",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))


SETUP = """\
import torch
torch.set_num_threads(1)
from slothbook import FastLanguageModel
from slothbook.profiler import MemoryProfiler
model, _ = FastLanguageModel.from_pretrained({name!r}, max_seq_length=64, dtype=torch.float32,
                                             device_map={{"": "cpu"}}, kernels=False)
model = FastLanguageModel.get_peft_model(model, r=8)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
"""

TRAIN = """\
seen = []
with MemoryProfiler(model, opt, live=True, refresh_s=0) as prof:
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (1, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step(); opt.zero_grad()
        prof.step()
        seen.append(len(prof._figure.data[0].x))  # what the widget shows after each step
print(type(prof._figure).__name__, seen, prof._figure.model_id)
"""


@pytest.mark.timeout(600)
def test_live_widget_builds_and_updates_in_a_jupyter_kernel(train_model_name, tmp_path):
    # Imported here: the GPU image has no Jupyter packages, and this module's other tests must still collect there.
    nbformat = pytest.importorskip("nbformat")
    NotebookClient = pytest.importorskip("nbclient").NotebookClient
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SETUP.format(name=train_model_name)), nbformat.v4.new_code_cell(TRAIN)]
    NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300, store_widget_state=True).execute()

    outputs = nb.cells[1].outputs
    views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 1, outputs
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream").split()
    assert printed[:4] == ["FigureWidget", "[1,", "2,", "3]"]  # redrawn after every step, not only at the end
    model_id = views[0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert model_id == printed[4]
    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"][model_id]["state"]
    assert state["_anywidget_id"].endswith("FigureWidget")  # plotly >= 6 renders through anywidget
    assert [t["name"] for t in state["_widget_data"]][:2] == ["base weights", "LoRA weights"]
