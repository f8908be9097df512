"""A real Jupyter kernel for tests, driven through nbclient one cell at a time.

Shared by tests/test_magics.py and tests/ui/ (import it as `from ui.kernel import KernelSession`: tests/ is on
sys.path because tests/conftest.py lives there).
"""

from __future__ import annotations

import contextlib
import os
import time
from queue import Empty

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

# Cells run under the 2-core CI budget: one thread each for torch and tokenizers.
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# A cell that takes longer than this fails with CellTimeoutError naming it, instead of stalling the run.
CELL_TIMEOUT_S = 300
POLL_SLICE_S = 0.5


def sliced_waits(channel) -> None:
    """Make `channel.get_msg` wait in short slices, each ending with a fresh look at the socket.

    nbclient stands in for the frontend of an Output widget: it sends the widget's new outputs to the kernel as
    comm messages on the shell socket while it awaits the cell's execute_reply on that same zmq.asyncio socket.
    The send can consume the socket's edge-triggered readiness signal, so the reply sits unread until the wait
    ends at the cell timeout (nbclient issue #312); a Studio cell that displays into an Output widget
    (`studio.estimate()`) hung that way about one time in four. pyzmq's poll checks the socket once more when
    its timeout fires, so a wait cut into slices finds the reply within one slice.
    """
    get_msg = channel.get_msg

    async def get_msg_in_slices(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE_S if deadline is None else max(0.0, min(POLL_SLICE_S, deadline - time.monotonic()))
            try:
                return await get_msg(timeout=left)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg_in_slices


class KernelSession:
    """`run(source)` executes one cell in a live kernel (started in `cwd`) and returns the cell's outputs."""

    def __init__(self, cwd, timeout: int = CELL_TIMEOUT_S):
        self.nb = nbformat.v4.new_notebook()
        self.client = NotebookClient(self.nb, kernel_name="python3", timeout=timeout, allow_errors=False,
                                     resources={"metadata": {"path": str(cwd)}})
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> KernelSession:
        old = {k: os.environ.get(k) for k in KERNEL_ENV}
        os.environ.update(KERNEL_ENV)  # the kernel process inherits the environment when it starts
        try:
            self._stack.enter_context(self.client.setup_kernel())
            for channel in (self.client.kc.shell_channel, self.client.kc.iopub_channel):
                sliced_waits(channel)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def run(self, source: str) -> list:
        """Outputs of the cell; CellExecutionError when it fails (its message holds the error)."""
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        return cell.outputs

    def interrupt(self) -> None:
        """What a frontend's "Interrupt kernel" does: SIGINT to the kernel process (its kernelspec's interrupt mode)."""
        from jupyter_core.utils import run_sync

        run_sync(self.client.km.interrupt_kernel)()

    def fails(self, source: str) -> str:
        """Run a cell that must fail; return the error text the user sees."""
        try:
            outputs = self.run(source)
        except CellExecutionError as exc:
            return str(exc)
        raise AssertionError(f"the cell did not fail; its outputs: {text(outputs)}")

    def value(self, expression: str):
        """The value of a Python literal expression evaluated in the kernel (repr round trip)."""
        import ast

        outputs = self.run(f"print(repr({expression}))")
        return ast.literal_eval(stream(outputs, "stdout").strip())


def stream(outputs, name: str) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == name)


def text(outputs) -> str:
    """Everything a user reads: streams, then the text/plain and text/html of displays and results."""
    parts = []
    for o in outputs:
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        elif "data" in o:
            parts.extend(o["data"].get(m, "") for m in ("text/plain", "text/html"))
        elif o.get("output_type") == "error":
            parts.append(f"{o['ename']}: {o['evalue']}")
    return "\n".join(parts)


def mimes(outputs) -> set[str]:
    return {m for o in outputs for m in o.get("data", {})}
