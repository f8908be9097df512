"""The memory figure: categories stacked per step with the peak and the device's total, loss and tokens/s beside.

One builder makes both the live `FigureWidget` (Jupyter; plotly >= 6 needs anywidget) and the static figure
that `save_html` / `save_png` write; `update_figure` redraws either in one batched message.
"""

from __future__ import annotations

from ..errors import ExportError
from .report import category_label
from .samples import DEVICE_CATEGORIES, Sample

GIB = 2**30
COLORS = {
    "weights": "#4C78A8", "lora": "#F58518", "gradients": "#E45756", "optimizer": "#72B7B2",
    "activations": "#54A24B", "rest": "#D3D3D3", "offloaded": "#B279A2",
}


def memory_figure(steps: list[Sample], widget: bool = False, cpu: bool = False):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=2, cols=2, column_widths=[0.64, 0.36], specs=[[{"rowspan": 2}, {}], [None, {}]],
        subplot_titles=("Memory by category (GiB)", "Loss", "Tokens/s"), horizontal_spacing=0.08,
    )
    for cat in DEVICE_CATEGORIES:
        fig.add_trace(go.Scatter(name=category_label(cat, cpu), mode="lines", stackgroup="memory",
                                 line=dict(width=0.5, color=COLORS[cat])), row=1, col=1)
    fig.add_trace(go.Scatter(name="step peak", mode="lines+markers", line=dict(color="black", width=2)), row=1, col=1)
    fig.add_trace(go.Scatter(name="machine memory" if cpu else "device total", mode="lines",
                             line=dict(color="firebrick", dash="dash")), row=1, col=1)
    fig.add_trace(go.Scatter(name="offloaded (host)", mode="lines", line=dict(color=COLORS["offloaded"], dash="dot")),
                  row=1, col=1)
    fig.add_trace(go.Scatter(name="loss", mode="lines+markers", showlegend=False, connectgaps=True), row=1, col=2)
    fig.add_trace(go.Scatter(name="tokens/s", mode="lines+markers", showlegend=False), row=2, col=2)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="step", row=2, col=2)
    fig.update_layout(height=460, margin=dict(l=50, r=20, t=40, b=40), legend=dict(orientation="h", y=-0.15),
                      hovermode="x unified", template="plotly_white")
    if widget:
        fig = go.FigureWidget(fig)
    update_figure(fig, steps)
    return fig


def update_figure(fig, steps: list[Sample]) -> None:
    x = [s.step for s in steps]
    columns = [[getattr(s, cat) / GIB for s in steps] for cat in DEVICE_CATEGORIES]
    columns.append([s.peak / GIB for s in steps])
    columns.append([s.capacity / GIB for s in steps])
    columns.append([s.offloaded / GIB for s in steps])
    columns.append([s.loss for s in steps])
    columns.append([s.tokens_per_s for s in steps])
    with fig.batch_update():
        for trace, y in zip(fig.data, columns):
            trace.x, trace.y = x, y
        _fit_memory_axis(fig, steps)


def _fit_memory_axis(fig, steps: list[Sample]) -> None:
    """Scale the memory axis to the stack when the device total is far above it (a small model on a large GPU,
    or the CPU's whole machine), so the categories stay readable; the title then names the total instead."""
    top = max((max(s.held, s.peak) for s in steps), default=0)
    capacity = max((s.capacity for s in steps), default=0)
    title = fig.layout.annotations[0]
    if top and capacity > 3 * top:
        fig.update_yaxes(range=[0, 1.15 * top / GIB], row=1, col=1)
        title.text = f"Memory by category (GiB); total {capacity / GIB:.1f} GiB, off the scale"
    else:
        fig.update_yaxes(autorange=True, row=1, col=1)
        title.text = "Memory by category (GiB)"


def save_html(fig, path) -> None:
    # The figure embeds plotly.js so the file opens offline.
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def save_png(fig, path, width: int, height: int) -> None:
    try:
        import kaleido  # noqa: F401
    except ImportError as exc:
        raise ExportError("save_png needs kaleido: pip install 'kaleido>=1.0' (and a Chrome or Chromium browser: "
                          "apt-get install chromium, or run plotly_get_chrome). save_html needs neither.") from exc
    try:
        fig.write_image(str(path), width=width, height=height)
    except RuntimeError as exc:
        if "chrome" not in str(exc).lower():
            raise
        raise ExportError("save_png renders through kaleido, which needs a Chrome or Chromium browser and found "
                          "none. Install one (apt-get install chromium, or run plotly_get_chrome), or set "
                          "BROWSER_PATH to its binary; save_html works without it.") from exc
