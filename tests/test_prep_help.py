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
    for path in Path(midnight_prep.__file__).parent.glob("*.py"):
        assert "DESIGN.md" not in path.read_text(), path
