"""docs/notebooks.md and the README's Notebooks section: every relative link and image resolves, the images are
real PNG/SVG files, and the walk-through names every notebook."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PAGES = [ROOT / "docs" / "notebooks.md", ROOT / "README.md"]


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not urlsplit(t).scheme and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_images_resolve(page):
    links = relative_links(page)
    assert links, f"{page.name} has no relative links"
    for target in links:
        path = (page.parent / unquote(urlsplit(target).path)).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{target} is not a PNG"
        elif path.suffix == ".svg":
            assert "<svg" in path.read_text()[:2000], f"{target} is not an SVG"


def test_walkthrough_shows_every_notebook_and_the_studio_screenshot():
    text = (ROOT / "docs" / "notebooks.md").read_text()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"(../notebooks/{notebook.name})" in text, f"docs/notebooks.md does not link {notebook.name}"
    images = {Path(t).name for t in relative_links(ROOT / "docs" / "notebooks.md") if t.endswith(".png")}
    assert {"studio.png", "estimate.png", "profiler.png"} <= images


def test_readme_notebooks_section_has_the_binder_badge_and_the_studio_picture():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    assert "https://mybinder.org/v2/gh/" in section and "labpath=notebooks%2F01_quickstart.ipynb" in section
    assert "(docs/img/studio.png)" in section
