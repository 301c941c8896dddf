"""The README's promises that a test can hold it to."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    block = re.search(r"## On a fresh machine.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README starts with the fresh-machine commands"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readmes_test_command_in_a_fresh_environment():
    main_job, test_command = _readme_commands()
    assert "adaptune train" in main_job and "adaptune generate" in main_job
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert "python3 -m venv" in ci and ci.index("python3 -m venv") < ci.index(test_command)
