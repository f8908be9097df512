"""Give the top-level name `kernels` back to Hugging Face's `kernels` distribution.

This folder is installed as `slothbook.kernels`. Run from a checkout (`python -c`, a Jupyter kernel or pytest started
in the repository root) the root is on sys.path, so `import kernels` finds this folder first, and transformers >= 5.25,
which imports Hugging Face's `kernels` by that name, fails. When that happens and the distribution is installed, the
name is handed over to it.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _elsewhere(package_dir: str) -> list[str]:
    """sys.path without the entries (including '' for the cwd) that lead to this folder's parent."""
    root = os.path.realpath(os.path.dirname(package_dir))
    return [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]


def installed_hub_kernels(package_dir: str):
    """Load the `kernels` distribution found outside the checkout into sys.modules, or return None if there is none."""
    spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere(package_dir))
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # its own submodules resolve through this entry while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
    if __name__ == "kernels._hub_name":  # loaded under the borrowed name: leave nothing of ours under it
        sys.modules.pop(__name__, None)
    return module
