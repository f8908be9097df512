"""Run notebooks/*.ipynb top to bottom in a fresh kernel each and save them with their outputs.

    python tests/notebooks/execute.py [NAME ...]     # default: every notebook

Run it after editing a notebook so the outputs GitHub shows are real. Widget state is dropped before saving: the
live figure's state carries plotly.js (megabytes) and GitHub renders no widgets anyway; finished figures are saved
as images by the code that shows them. Prints how long each took.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the kernel helpers

from ui.kernel import sliced_waits  # noqa: E402


def execute(path: Path, timeout: int = 900) -> float:
    nb = nbformat.read(path, as_version=4)
    # nbclient's Output-widget capture needs the widget state kept while it runs.
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    # The Studio notebook displays into Output widgets: without this a reply can wait out the timeout.
    client.on_notebook_start = lambda notebook: [sliced_waits(c) for c in (client.kc.shell_channel,
                                                                             client.kc.iopub_channel)]
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, str(path))
    return seconds


def main(names: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Loading and dataset-mapping bars would be saved at 0% (their widgets' later states do not show on GitHub).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    paths = [NOTEBOOKS / f"{n.removesuffix('.ipynb')}.ipynb" for n in names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    total = 0.0
    for path in paths:
        seconds = execute(path)
        total += seconds
        print(f"{path.name:<32} {seconds:6.1f} s", flush=True)
    print(f"{'total':<32} {total:6.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
