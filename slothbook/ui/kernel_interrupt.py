"""The kernel's Interrupt while a fine-tune runs in a background thread: stop after the step, with a checkpoint.

Python runs signal handlers in the main thread only, so the GracefulStop of a worker thread installs none. And
ipykernel ignores SIGINT between messages: it sets SIG_IGN at start, switches to KeyboardInterrupt while a cell or
widget event runs, and puts the between-messages handler back afterwards. So with the Studio training and the
kernel idle, "Interrupt kernel" would do nothing. `InterruptStops` takes that between-messages slot (outside a
kernel: the SIGINT handler itself) and turns the signal into `GracefulStop.request()`. While a cell runs the
kernel's KeyboardInterrupt applies as usual (`Studio.wait` turns it into the same request). While the kernel handles
any other message (a widget's comm message, sent as the live figure updates), ipykernel would raise
KeyboardInterrupt inside that handler, log it and drop it; there the stop is requested instead.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

REASON = "kernel interrupt"


def _kernel():
    """The running ipykernel, where its between-messages SIGINT handler can be swapped; None elsewhere."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    kernel = getattr(get_ipython(), "kernel", None)
    return kernel if hasattr(kernel, "saved_sigint_handler") else None


def _message_type(kernel) -> str | None:
    """The type of the shell message the kernel is handling; None where this ipykernel does not say."""
    try:
        return kernel.get_parent("shell")["header"]["msg_type"]
    except Exception:  # an older ipykernel, or no message yet
        return None


class InterruptStops:
    """While `running()`, SIGINT calls `stop.request(REASON)` and then `on_stop()`; otherwise it does what the
    handler it replaced did (in an idle kernel: nothing), and the first such signal after the run puts that
    handler back. `install()` and `uninstall()` act only in the main thread, where signal handlers are set."""

    def __init__(self, stop, running: Callable[[], bool], on_stop: Callable[[], None] | None = None):
        self.stop, self.running, self.on_stop = stop, running, on_stop
        self._kernel = None
        self._previous = None
        self._kernel_pre_hook = None
        self.installed = False

    def install(self) -> bool:
        if self.installed or threading.current_thread() is not threading.main_thread():
            return False
        self._kernel = _kernel()
        if self._kernel is not None:
            # ipykernel's post-message hook sets this handler; a signal.signal here would last until this cell ends.
            self._previous = self._kernel.saved_sigint_handler
            self._kernel.saved_sigint_handler = self._on_sigint
            self._kernel_pre_hook = self._kernel.pre_handler_hook  # the kernel's own, or one set on it before us
            self._kernel.pre_handler_hook = self._pre_handler_hook
        else:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self.installed = True
        return True

    def uninstall(self) -> None:
        if not self.installed or threading.current_thread() is not threading.main_thread():
            return
        if self._kernel is not None:
            if self._kernel.saved_sigint_handler == self._on_sigint:
                self._kernel.saved_sigint_handler = self._previous
            if self._kernel.__dict__.get("pre_handler_hook") == self._pre_handler_hook:
                del self._kernel.pre_handler_hook
                if self._kernel.pre_handler_hook != self._kernel_pre_hook:  # one was set on the instance before us
                    self._kernel.pre_handler_hook = self._kernel_pre_hook
        if signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)
        self.installed = False

    def _pre_handler_hook(self) -> None:
        """The kernel's hook before each message (it sets KeyboardInterrupt for the handler); during a run, a message
        that is not a cell's keeps this SIGINT handler, so an interrupt arriving then still stops the run."""
        self._kernel_pre_hook()
        if self.running() and _message_type(self._kernel) not in (None, "execute_request"):
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.running():
            if not self.stop.requested:
                self.stop.request(REASON)
                if self.on_stop is not None:
                    self.on_stop()
                return
        else:
            self.uninstall()
        if callable(self._previous):  # e.g. default_int_handler outside a kernel: KeyboardInterrupt
            self._previous(signum, frame)
