"""The Studio panel in a real Jupyter kernel: choosers, preview, estimate, background training, stop, export and
errors shown in the panel. Widget state is read back from the kernel, where the panel lives."""

from __future__ import annotations

import json
import time

import pytest

from ui.kernel import KernelSession, stream

# 16-bit LoRA on 32-token sequences: the quickest real training on a CPU.
QUICK = "steps=3, max_seq_length=32, batch_size=1, load_in_4bit=False, output='runs'"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studio")
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]}
            for i in range(5)]
    (folder / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "not_a_model").mkdir()
    with KernelSession(folder) as session:
        session.run(f"from slothbook.ui import Studio\nstudio = Studio({QUICK})\nstudio")
        yield session


def test_panel_shows_the_embedded_model_a_device_and_the_demo_preview(kernel):
    import torch

    assert "embedded SmolLM2-135M-Instruct" in kernel.value("studio.model_hint.value")
    devices = kernel.value("studio.device_box.options")
    assert all("GiB free" in label for label, _ in devices)
    assert [d for _, d in devices][0] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    preview = kernel.value("studio.data_preview.value")
    assert "format: alpaca" in preview and "400 rows" in preview and "Convert 27 hours" in preview
    assert kernel.value("studio.text_field.value") == "text"


def test_model_hint_tells_folders_and_hub_ids_apart(kernel):
    kernel.run("studio.model_box.value = 'not_a_model'")
    assert "no config.json" in kernel.value("studio.model_hint.value")
    kernel.run("studio.model_box.value = 'someone/some-model'")
    assert "hub id" in kernel.value("studio.model_hint.value")
    kernel.run("studio.model_box.value = 'smollm2-135m'")


def test_dataset_by_path_by_upload_and_a_missing_one(kernel):
    kernel.run("studio.data_kind.value = 'path'; studio.data_path.value = 'chats.jsonl'")
    preview = kernel.value("studio.data_preview.value")
    assert "format: openai" in preview and "5 rows" in preview
    assert kernel.value("studio.config().dataset") == "chats.jsonl"
    # No text column: the rows are rendered as chats ("text" names no column, so run_finetune converts them).
    assert kernel.value("studio.text_field.options") == (("render the openai rows as chats", "text"),)
    assert kernel.value("studio.config().text_field") == "text"

    # What the browser sends when a file is picked.
    kernel.run("import datetime\n"
               "studio.upload.value = ({'name': 'qa.csv', 'type': 'text/csv', 'size': 30, "
               "'last_modified': datetime.datetime.now(), "
               "'content': memoryview(b'prompt,completion\\nhi,hello\\n2+2,4\\n')},)\n"
               "studio.data_kind.value = 'upload'")
    assert "format: prompt-completion" in kernel.value("studio.data_preview.value")
    assert [v for _, v in kernel.value("studio.text_field.options")] == ["text", "prompt", "completion"]
    assert kernel.value("studio.config().dataset").endswith("uploads/qa.csv")

    kernel.run("studio.data_kind.value = 'path'; studio.data_path.value = 'missing.jsonl'")  # must not raise
    assert "DatasetError: Dataset file not found" in kernel.value("studio.status.value")
    kernel.run("studio.data_kind.value = 'demo'")
    assert kernel.value("studio.config().dataset") is None


def test_estimate_shows_a_chart_and_warns_when_it_will_not_fit(kernel):
    kernel.run("studio.estimate()")
    assert "Estimate ready" in kernel.value("studio.status.value")
    assert "predicted peak" in kernel.value("str(studio.estimate_out.outputs)")  # the Output widget's displays
    assert {"image/png", "application/vnd.plotly.v1+json"} & set(
        kernel.value("sorted({m for o in studio.estimate_out.outputs for m in o.get('data', {})})"))

    kernel.run("studio.max_seq_length.value = 2**20; studio.batch_size.value = 64; studio.estimate()")
    assert "will not fit" in kernel.value("studio.status.value")
    assert "Will not fit" in kernel.value("str(studio.estimate_out.outputs)")
    kernel.run("studio.max_seq_length.value = 32; studio.batch_size.value = 1")


def test_train_runs_in_the_background_and_updates_figure_and_progress(kernel):
    outputs = kernel.run("studio.train()\nprint(studio.busy)")
    assert stream(outputs, "stdout").strip() == "True"  # the cell returned while training goes on
    kernel.run("studio.wait()")
    assert kernel.value("studio.view.bar.value") == 3
    assert kernel.value("studio.view.bar.bar_style") == "success"
    assert kernel.value("list(studio.view.figure.data[0].x)") == [1, 2, 3]  # the live figure got every step
    assert "3 steps: loss" in kernel.value("studio.status.value")
    assert "tokens/s" in kernel.value("studio.view.status.value") or "3 steps" in kernel.value(
        "studio.view.status.value")
    assert "step     3 | loss" in kernel.value("studio.log.widget.value")  # printing went to the Log tab
    assert kernel.value("type(studio.model).__name__") == "PeftModelForCausalLM"
    assert kernel.value("(studio.result.adapter_dir / 'adapter_model.safetensors').is_file()")
    assert kernel.value("studio.train_button.disabled") is False


CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


def _train_until(kernel, steps_done: int) -> None:
    """Start a 50-step run from a cell and return (the kernel idle, training going on) once `steps_done` are done."""
    kernel.run(f"import time\nstudio.steps.value = 50\nstudio.train()\n"
               f"while len(studio.profiler.steps) < {steps_done} and studio.busy: time.sleep(0.05)")


def _assert_stopped_with_a_checkpoint(kernel, reason: str) -> int:
    """The run ended early with a whole checkpoint and a loadable adapter, and the panel says where they are."""
    kernel.run("studio.wait()\nstudio.steps.value = 3\nresult = studio.result")
    step = kernel.value("result.trainer.state.global_step")
    assert 1 <= step < 50
    assert kernel.value("result.stopped") == reason
    checkpoint = kernel.value("str(result.checkpoint_dir)")
    assert checkpoint.endswith(f"checkpoints/checkpoint-{step}")
    for name in CHECKPOINT_FILES:
        assert kernel.value(f"(result.checkpoint_dir / {name!r}).is_file()"), name
    assert kernel.value("__import__('json').loads((result.checkpoint_dir / 'trainer_state.json').read_text())"
                        "['global_step']") == step
    adapter = kernel.value("str(result.adapter_dir)")
    status = kernel.value("studio.status.value")
    assert f"Stopped after step {step} of 50 ({reason})" in status
    assert f"checkpoint saved to {checkpoint}; adapter saved to {adapter}" in status
    assert kernel.value("studio.view.bar.bar_style") == "warning"
    # The saved adapter loads onto the base model.
    kernel.run("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
               "from slothbook.models.embedded import embedded_model_dir\n"
               "reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_model_dir()), "
               "result.adapter_dir)")
    assert kernel.value("type(reloaded).__name__") == "PeftModelForCausalLM"
    return step


def test_stop_ends_after_the_current_step_with_a_checkpoint_and_the_adapter(kernel):
    # Stop pressed while the second step runs: transformers' notebook bar used to fail in on_train_end here.
    _train_until(kernel, steps_done=1)
    kernel.run("studio.stop_button.click()")
    assert "Stop button: stopping after the current step" in kernel.value("studio.status.value")
    assert _assert_stopped_with_a_checkpoint(kernel, "Stop button") <= 3


def test_interrupting_the_kernel_while_the_studio_trains_stops_with_a_checkpoint(kernel):
    """"Interrupt kernel" (SIGINT to the kernel process) with the kernel idle and training in its worker thread."""
    _train_until(kernel, steps_done=1)
    kernel.interrupt()
    deadline = time.monotonic() + 30
    while "kernel interrupt: stopping" not in kernel.value("studio.status.value"):
        assert time.monotonic() < deadline, "the interrupt did not reach the Studio"
        time.sleep(0.2)
    _assert_stopped_with_a_checkpoint(kernel, "kernel interrupt")
    # wait() gave the kernel back its own between-messages handler (which ignores SIGINT).
    assert kernel.value("get_ipython().kernel.saved_sigint_handler == __import__('signal').SIG_IGN")


# In the kernel: SIGINT once the main thread is blocked in Job.wait, as "Interrupt kernel" during a waiting cell.
INTERRUPT_THE_WAIT = """
import os, signal, sys, threading

def _main_thread_waits():
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("jobs.py"):
            return True
        frame = frame.f_back
    return False

def _interrupt_the_wait():
    while not _main_thread_waits():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=_interrupt_the_wait, daemon=True).start()
"""


def test_interrupting_a_cell_that_waits_for_the_studio_stops_training_with_a_checkpoint(kernel):
    """`studio.train(wait=True)` interrupted: the KeyboardInterrupt in the waiting cell becomes a stop request."""
    _train_until(kernel, steps_done=1)
    kernel.run(INTERRUPT_THE_WAIT + "studio.wait()")  # the cell ends without a KeyboardInterrupt
    _assert_stopped_with_a_checkpoint(kernel, "kernel interrupt")


def test_stop_before_the_first_step_still_trains_one_step(kernel):
    kernel.run("studio.steps.value = 50\nstudio.train()\nstudio.stop()\nstudio.wait()\nstudio.steps.value = 3")
    assert kernel.value("studio.result.trainer.state.global_step") == 1
    assert kernel.value("(studio.result.checkpoint_dir / 'optimizer.pt').is_file()")
    assert kernel.value("(studio.result.adapter_dir / 'adapter_model.safetensors').is_file()")


def test_export_from_the_panel_reports_paths_and_size(kernel):
    kernel.run("studio.export('lora', path='exported/lora', wait=True)")
    assert kernel.value("studio.last_export.paths[0].joinpath('adapter_model.safetensors').is_file()")
    assert kernel.value("studio.last_export.bytes") > 1_000_000
    assert "exported lora: exported/lora (" in kernel.value("studio.export_result.value")
    assert kernel.value("studio.export_progress.bar_style") == "success"


def test_errors_in_background_jobs_show_in_the_panel(kernel):
    # An export onto a file: the error is shown in the export tab and the status line, and wait() raises it.
    outputs = kernel.run("open('a_file', 'w').close()\n"
                         "try:\n    studio.export('gguf', 'q8_0', path='a_file', wait=True)\n"
                         "except Exception as exc:\n    print(type(exc).__name__)")
    assert stream(outputs, "stdout").strip() == "ExportError"
    assert "ExportError" in kernel.value("studio.export_result.value")
    assert kernel.value("studio.export_progress.bar_style") == "danger"

    # A training that fails after loading (a learning rate of 0 is refused by the trainer's arguments).
    outputs = kernel.run("studio.lr.value = 0.0\nstudio.train()\n"
                         "try:\n    studio.wait()\nexcept Exception as exc:\n    print(type(exc).__name__)")
    assert stream(outputs, "stdout").strip() == "ConfigError"
    assert "learning rate must be positive" in kernel.value("studio.status.value")
    assert kernel.value("studio.view.bar.bar_style") == "danger"
    assert "Traceback" not in kernel.value("studio.status.value")  # a slothbook error needs no traceback
    kernel.run("studio.lr.value = 2e-4")


def test_buttons_report_errors_in_the_panel_instead_of_raising(kernel):
    outputs = kernel.run("studio.stop_button.disabled = False\nstudio.stop_button.click()\n"
                         "studio.model_box.value = './no/such/model'\nstudio.estimate_button.click()\nprint('ok')")
    assert stream(outputs, "stdout").strip() == "ok" and "Traceback" not in stream(outputs, "stderr")
    assert "ModelNotFoundError" in kernel.value("studio.status.value")
    kernel.run("studio.model_box.value = 'smollm2-135m'")
