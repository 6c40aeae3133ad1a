"""Every midnight-prep command's help ends with examples, kept on their own lines."""

from pathlib import Path

import pytest
from click.testing import CliRunner

import midnight_prep
from midnight_prep.cli import main


@pytest.mark.parametrize("command", ["build", "plan", "run", "status", "inspect"])
def test_help_has_examples_on_their_own_lines(command):
    result = CliRunner().invoke(main, [command, "-h"])
    assert result.exit_code == 0
    examples = [line for line in result.output.splitlines() if line.startswith(f"  midnight-prep {command} ")]
    assert examples, result.output
    assert all(line.count("midnight-prep") == 1 for line in examples)  # not rewrapped together


def test_sources_cite_only_what_users_have():
    """Every project document (an upper-case name with the .md suffix) a module, script or test names is in the
    repository: code cites only what its users have."""
    import re
    import subprocess

    root = Path(midnight_prep.__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    present = {Path(f).name for f in tracked if f.endswith(".md")}
    for name in tracked:
        if name.endswith((".py", ".sh", ".yaml")) or name.startswith("bin/"):
            for cited in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", (root / name).read_text()):
                assert cited in present, f"{name} cites {cited}, which the repository does not have"
