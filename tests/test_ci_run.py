"""`.ci/run` runs the README's test command verbatim inside a brand-new venv without system site packages."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_TEST_LINE_START = 'pip install torch==2.13.0 && pip install -e ".[test]"'


def _ci_commands() -> list[str]:
    """The non-comment, non-blank lines of `.ci/run`."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _readme_test_line() -> str:
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.strip().startswith(README_TEST_LINE_START)]
    assert len(lines) == 1, f"README.md should hold exactly one line starting with {README_TEST_LINE_START!r}"
    return lines[0]


def test_ci_runs_the_readme_test_line_verbatim() -> None:
    line = _readme_test_line()
    commands = _ci_commands()
    assert line in commands, f"`.ci/run` does not contain the README's test line verbatim: {line!r}"
    assert commands[-1] == line, "the README's test line should be the last command of `.ci/run`"


def test_ci_creates_a_fresh_venv_without_system_site_packages_first() -> None:
    commands = _ci_commands()
    text = "\n".join(commands)
    assert "set -euo pipefail" in commands
    assert "--system-site-packages" not in text
    assert "virtualenv" not in text and "uv venv" not in text
    venv_at = next((i for i, c in enumerate(commands) if re.search(r"\bpython3? -m venv\b", c)), None)
    assert venv_at is not None, "`.ci/run` must create a venv with `python -m venv`"
    venv_dir = shlex.split(commands[venv_at].split("-m venv", 1)[1])[0]
    activate_at = next((i for i, c in enumerate(commands) if re.fullmatch(r'(\.|source) "?\$VENV/bin/activate"?', c)),
                       None)
    assert activate_at is not None and activate_at > venv_at, "the new venv must be activated after it is created"
    assert venv_dir == "$VENV", venv_dir
    assert commands.index(_readme_test_line()) > activate_at, "the README line must run inside the new venv"
    # Fresh on every run: a new temporary folder, removed on exit (never a reused path in the checkout).
    assert any(re.search(r"mktemp -d", c) for c in commands[:venv_at]), "the venv must live in a new temp dir"
    assert any(c.startswith("trap ") and "rm -rf" in c for c in commands), "the temp venv must be removed on exit"
    # Chromium from Debian stays; Playwright never downloads browsers.
    assert any("apt-get install" in c and "chromium" in c for c in commands)
    assert "playwright install" not in text
    for var in ("HF_HUB_OFFLINE=1", "GRADIO_ANALYTICS_ENABLED=False", "PIP_DISABLE_PIP_VERSION_CHECK=1"):
        assert var in text
