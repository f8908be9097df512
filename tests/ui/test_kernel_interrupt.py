"""InterruptStops outside a kernel (a script driving the Studio): SIGINT asks the stop while the job runs; after it,
SIGINT is Ctrl-C again. Inside a kernel: ipykernel's own message hooks around a comm message and a cell (the
whole kernel's case, Interrupt pressed while the Studio trains, is in test_studio.py)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from slothbook.train.interrupt import GracefulStop
from slothbook.ui.kernel_interrupt import REASON, InterruptStops


def test_sigint_requests_the_stop_while_running_then_gives_ctrl_c_back():
    before = signal.getsignal(signal.SIGINT)
    stop, running, told = GracefulStop(), [True], []
    interrupts = InterruptStops(stop, lambda: running[0], on_stop=lambda: told.append(stop.reason))
    assert interrupts.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.reason == REASON and told == [REASON]
        with pytest.raises(KeyboardInterrupt):  # a second one while still running: Ctrl-C as usual
            os.kill(os.getpid(), signal.SIGINT)
        running[0] = False
        with pytest.raises(KeyboardInterrupt):  # the first after the run hands the handler back
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is before and not interrupts.installed
    finally:
        interrupts.uninstall()


def test_off_the_main_thread_it_installs_nothing():
    before = signal.getsignal(signal.SIGINT)
    interrupts = InterruptStops(GracefulStop(), lambda: True)
    installed = []
    worker = threading.Thread(target=lambda: installed.append(interrupts.install()))
    worker.start()
    worker.join()
    assert installed == [False] and signal.getsignal(signal.SIGINT) is before


class KernelHooks:
    """ipykernel's Kernel as far as its SIGINT handling goes: its real pre/post message hooks and the parent message."""

    from ipykernel.kernelbase import Kernel

    pre_handler_hook = Kernel.pre_handler_hook
    post_handler_hook = Kernel.post_handler_hook

    def __init__(self):
        self.saved_sigint_handler = signal.SIG_IGN  # what ipykernel sets between messages at start
        self.msg_type = None

    def get_parent(self, channel=None):
        return {"header": {"msg_type": self.msg_type}}


def test_an_interrupt_during_a_widget_message_stops_the_run_and_one_during_a_cell_interrupts_it(monkeypatch):
    import slothbook.ui.kernel_interrupt as module

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    kernel = KernelHooks()
    monkeypatch.setattr(module, "_kernel", lambda: kernel)
    stop = GracefulStop()
    interrupts = InterruptStops(stop, lambda: True)
    try:
        assert interrupts.install()
        kernel.msg_type = "execute_request"  # a cell runs: Ctrl-C interrupts it, as without a run
        kernel.pre_handler_hook()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        kernel.post_handler_hook()
        assert not stop.requested
        kernel.msg_type = "comm_msg"  # ipykernel alone would raise KeyboardInterrupt here, log it and drop it
        kernel.pre_handler_hook()
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("the interrupt became a KeyboardInterrupt in the comm handler, where ipykernel drops it")
        kernel.post_handler_hook()
        assert stop.requested and stop.reason == REASON
        interrupts.uninstall()
        assert "pre_handler_hook" not in vars(kernel) and kernel.saved_sigint_handler is signal.SIG_IGN
    finally:
        interrupts.uninstall()
        signal.signal(signal.SIGINT, before)
