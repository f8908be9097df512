"""The README's two Quickstart commands are the ones CI runs and the CLI accepts."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_quickstart_commands():
    commands = quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].endswith("slothbook finetune")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^TEST_COMMAND='(.+)'$", ci, flags=re.M)
    assert match and match.group(1) == quickstart_commands()[1]


def test_ci_fails_when_pytest_collects_nothing():
    # pytest exits 5 when no test ran; `set -e` and a plain `bash -c` let that fail the script.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci and "|| true" not in ci
