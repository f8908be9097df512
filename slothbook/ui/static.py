"""Figures that survive being saved: a PNG (through kaleido) beside plotly's own JSON.

A live `FigureWidget` shows nothing once the kernel is gone, and GitHub renders neither widgets nor plotly's
JavaScript. So finished figures are displayed as a bundle: JupyterLab draws the interactive plotly JSON, GitHub
and nbviewer fall back to the PNG. Without kaleido (or the Chrome it drives) plotly's own renderer is used.
"""

from __future__ import annotations

import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("slothbook")

PLOTLY_MIME = "application/vnd.plotly.v1+json"


def png_bytes(fig, width: int | None = None, height: int | None = None, timeout_s: float = 60) -> bytes | None:
    """The figure as PNG bytes, or None when kaleido or a Chrome/Chromium for it is missing, or it takes too long.

    kaleido is called directly to turn MathJax off: by default it fetches MathJax from a CDN, which stalls
    offline (plotly's `to_image` cannot pass that setting). The whole render runs in a worker thread with a
    deadline, so a browser that never starts cannot hang the notebook.
    """
    try:
        import kaleido
    except ImportError:
        return None
    width = width or fig.layout.width or 1000
    height = height or fig.layout.height or 460
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slothbook-png")
    job = pool.submit(kaleido.calc_fig_sync, fig.to_dict(), opts=dict(format="png", width=width, height=height),
                      kopts=dict(mathjax=False, timeout=timeout_s))
    try:
        return job.result(timeout=timeout_s)
    except Exception as exc:  # no browser, a browser that crashed or hangs: the PNG is a nicety
        log.debug("no PNG for the figure: %s", exc)
        return None
    finally:
        pool.shutdown(wait=False)


class StaticFigure:
    """Displays as interactive plotly JSON plus a PNG, so saved notebooks show the figure everywhere."""

    def __init__(self, fig, width: int | None = None, height: int | None = None):
        self.fig = fig
        self.png = png_bytes(fig, width, height)

    def _repr_mimebundle_(self, include=None, exclude=None):
        if self.png is None:
            return self.fig._repr_mimebundle_(include, exclude)  # plotly picks what this frontend renders
        return {
            PLOTLY_MIME: json.loads(self.fig.to_json()),
            "image/png": base64.b64encode(self.png).decode("ascii"),
            "text/plain": f"<{self.fig.layout.title.text or 'plotly figure'}>",
        }


def show_static(fig, width: int | None = None, height: int | None = None) -> StaticFigure:
    """Display `fig` as a `StaticFigure` and return it."""
    from IPython.display import display

    static = StaticFigure(fig, width, height)
    display(static)
    return static
