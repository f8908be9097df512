"""What the Studio's choosers say: the kind of a model choice, the dataset preview, uploaded files."""

from __future__ import annotations

import datasets

from slothbook.ui.sources import describe_model, preview_html, save_upload


def test_model_kinds(tmp_path):
    assert describe_model("smollm2-135m")[0] == "ok"
    (tmp_path / "m").mkdir()
    assert describe_model(str(tmp_path / "m")) == ("warning", "this folder has no config.json (nor a single .gguf file)")
    (tmp_path / "m" / "config.json").write_text("{}")
    assert describe_model(str(tmp_path / "m"))[1] == "local transformers folder"
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert "GGUF file" in describe_model(str(tmp_path / "x.gguf"))[1]
    assert "hub id" in describe_model("owner/model")[1]


def test_preview_escapes_and_shortens_cells():
    ds = datasets.Dataset.from_list([{"text": "<b>bold</b>" + "x" * 500}, {"text": "two"}])
    html = preview_html(ds, "text")
    assert "format: text" in html and "2 rows" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold" in html and " ..." in html


def test_uploads_are_written_under_their_base_name_only(tmp_path):
    value = ({"name": "../../evil.jsonl", "content": memoryview(b'{"text": "hi"}\n')},)
    path = save_upload(value, tmp_path / "uploads")
    assert path == tmp_path / "uploads" / "evil.jsonl" and path.read_bytes() == b'{"text": "hi"}\n'
