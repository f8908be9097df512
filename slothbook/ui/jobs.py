"""Work in a background thread so the notebook stays responsive, with its printing kept in its own log.

A kernel has one stdout, and a print from a background thread lands in whichever cell happens to be running.
`Job` routes what its thread writes to sys.stdout / sys.stderr into a log callback instead; other threads
write through unchanged. The router is installed once and stays: it is a dictionary lookup per write. Logging
handlers made before it (transformers' and datasets' own, at import) hold the stream itself; they are pointed at
the router too, so a library's warning from the job lands in its log as well.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Callable

_routes: dict[int, Callable[[str], None]] = {}


class _Router(io.TextIOBase):
    """Stands in for a text stream: writes from a routed thread go to its sink, the rest to the stream."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        sink = _routes.get(threading.get_ident())
        if sink is None:
            return self._stream.write(text)
        sink(text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):  # the kernel's stream API (set_parent, encoding, ...)
        return getattr(self._stream, name)


def _install_router() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Router):
            setattr(sys, name, _Router(stream))
    routers = {id(r._stream): r for r in (sys.stdout, sys.stderr) if isinstance(r, _Router)}
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):  # loggerDict also holds placeholders, without handlers
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in routers:
                handler.setStream(routers[id(handler.stream)])


class Job:
    """Runs `target()` in a daemon thread. `result` or `error` is set when it ends; `on_done(job)` runs then,
    in that thread. `log(text)` receives what the thread prints (None: it prints as usual)."""

    def __init__(self, target: Callable[[], object], on_done: Callable[[Job], None] | None = None,
                 log: Callable[[str], None] | None = None, name: str = "slothbook-job"):
        self.target, self.on_done, self.log = target, on_done, log
        self.result = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # Waited on instead of join(): a KeyboardInterrupt inside Thread.join (CPython 3.11) marks the thread as
        # ended while it still runs, and Studio.wait turns that interrupt into a stop request.
        self._done = threading.Event()

    def start(self) -> Job:
        if self.log is not None:
            _install_router()
        self._thread.start()
        return self

    def _run(self) -> None:
        ident = threading.get_ident()
        if self.log is not None:
            _routes[ident] = self.log
        try:
            self.result = self.target()
        except BaseException as exc:  # shown by on_done; re-raised by wait()
            self.error = exc
        finally:
            try:
                if self.on_done is not None:
                    self.on_done(self)
            finally:
                _routes.pop(ident, None)
                self._done.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._done.is_set()

    def wait(self, timeout: float | None = None):
        """Block until the job ends; return its result or raise its error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self._thread.name} is still running after {timeout} s.")
        if self.error is not None:
            raise self.error
        return self.result
