"""The export dispatcher's own checks (the exports themselves are tested in tests/export/, and end to end by the
magic and Studio tests)."""

from __future__ import annotations

import pytest

from slothbook.errors import ConfigError
from slothbook.ui.export import METHODS, export_model, gguf_types, size_on_disk


@pytest.mark.parametrize("method, quantization, expected", [
    ("zip", None, "Unknown export method 'zip'. Choose one of: lora, merged_16bit"),
    ("lora", "q4_k_m", "applies to gguf exports only"),
])
def test_bad_requests_say_what_to_do(tmp_path, method, quantization, expected):
    with pytest.raises(ConfigError) as info:
        export_model(object(), None, method, tmp_path / "out", quantization)
    assert expected in str(info.value)


def test_nothing_to_export_before_training(tmp_path):
    with pytest.raises(ConfigError, match="train one first"):
        export_model(None, None, "lora", tmp_path)


def test_choices_and_sizes(tmp_path):
    assert METHODS == ("lora", "merged_16bit", "merged_4bit", "gguf")
    assert {"q8_0", "f16", "q4_k_m"} <= set(gguf_types())
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert size_on_disk(tmp_path) == 15 and size_on_disk(tmp_path / "a") == 10
