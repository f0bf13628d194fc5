"""The README's CLI block against the CLI itself: every command it lists exists, and every flag
it shows for a command is in that command's --help (a doc that runs cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from mintmesh.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _root():
    return typer.main.get_command(app)


def readme_commands() -> list[tuple[tuple[str, ...], set[str]]]:
    """(command path, flags shown) for each command of the README's CLI block; a line
    `mint adapter list [TENANT] | show REF` names two commands of one group."""
    text = README.read_text()
    m = re.search(r"^## The CLI\n+```\n(.*?)^```", text, re.S | re.M)
    assert m, "no ``` block under '## The CLI' in README.md"
    lines: list[str] = []
    for raw in m.group(1).splitlines():
        left = re.split(r"\s{3,}(?=[a-z(])", raw.strip())[0]  # drop the description column
        if left.startswith("mint "):
            lines.append(left)
        elif left.startswith(("[", "--")) and lines:
            lines[-1] += " " + left  # a continuation of the command above
    root = _root()
    out = []
    for line in lines:
        words = line.split()[1:]
        group = root.commands.get(words[0])
        if hasattr(group, "commands"):  # a group (typer's own click: no isinstance check)
            names = set(group.commands)
            segments = re.split(r"\s\|\s(?=([a-z-]+)\b)", " ".join(words[1:]))
            # re.split keeps the lookahead's group: drop those, keep segments that start with
            # a command of the group (the rest belongs to the segment before).
            parts: list[str] = []
            for seg in segments[::2]:
                if parts and seg.split()[0] not in names:
                    parts[-1] += " | " + seg
                else:
                    parts.append(seg)
            for seg in parts:
                out.append(((words[0], seg.split()[0]), set(re.findall(r"--[a-z][a-z-]*", seg))))
        else:
            out.append(((words[0],), set(re.findall(r"--[a-z][a-z-]*", line))))
    return out


COMMANDS = readme_commands()


def test_the_block_lists_export_and_measured_eval():
    got = {(path, frozenset(flags)) for path, flags in COMMANDS}
    assert (("adapter", "export"), frozenset({"--force", "--json"})) in got
    assert any(p == ("adapter", "eval") and "--data" in f for p, f in got)


@pytest.mark.parametrize("path, flags", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_each_readme_command_and_flag_is_in_its_help(path, flags):
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    missing = sorted(f for f in flags if not re.search(rf"{re.escape(f)}\b", res.output))
    assert not missing, f"`mint {' '.join(path)} --help` lacks {missing}"
