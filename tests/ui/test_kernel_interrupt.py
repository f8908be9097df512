"""InterruptStops outside a kernel (a script driving the Studio): SIGINT asks the stop while the job runs; after it,
SIGINT is Ctrl-C again. The kernel's case is in test_studio.py."""

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
