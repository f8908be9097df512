"""Saved figures: a PNG through kaleido beside plotly's JSON, so GitHub shows what JupyterLab draws."""

from __future__ import annotations

import base64

import plotly.graph_objects as go
import pytest

from slothbook.ui.static import PLOTLY_MIME, StaticFigure, png_bytes


def test_bundle_has_png_and_plotly_json():
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[2, 1, 3]), layout=dict(title="three points"))
    if png_bytes(fig, 200, 150) is None:
        pytest.skip("kaleido cannot render here (no kaleido or no Chrome/Chromium)")
    bundle = StaticFigure(fig, 300, 200)._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert bundle[PLOTLY_MIME]["data"][0]["y"] == [2, 1, 3]
    assert bundle["text/plain"] == "<three points>" and "text/html" not in bundle


def test_a_render_past_its_deadline_gives_no_png_instead_of_hanging():
    fig = go.Figure(go.Scatter(x=[1, 2], y=[1, 2]))
    assert png_bytes(fig, 200, 150, timeout_s=0.001) is None
