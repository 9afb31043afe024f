"""The documentation works as written: its examples run, its commands parse, the README stays a
front door.

* Every Python block that follows :data:`MARKER` in the README, CONTRIBUTING.md or ``docs/`` is
  executed (the README's Flax example among them).
* Every ``python -m experiments.<command> ...`` line (and ``bash scripts/train.sh ...``, which
  runs ``experiments.train``) of a shell block is parsed by that command's own parser: a flag
  that no longer exists, or a value it refuses, fails here.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [
    README,
    ROOT / "CONTRIBUTING.md",
    ROOT / "BENCHMARKS.md",
    *sorted(ROOT.glob("docs/*.md")),
]
MARKER = "<!-- The block below is executed by tests/test_docs.py. -->"
#: What ends a command on a shell line.
SHELL_OPERATORS = {"|", "<", ">", "&&", "||", ";", "2>", "2>&1"}


def fenced_blocks(text: str, languages: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(offset, body)`` of every fenced block of ``text`` in one of ``languages``."""
    pattern = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
    return [(m.start(), m.group(2)) for m in pattern.finditer(text) if m.group(1) in languages]


def executed_blocks() -> list[tuple[str, str]]:
    """``(where, code)`` of every Python block that follows the marker."""
    blocks = []
    for path in DOCUMENTS:
        text = path.read_text()
        for offset, body in fenced_blocks(text, ("python",)):
            if text[:offset].rstrip().endswith(MARKER):
                line = text[:offset].count("\n") + 1
                blocks.append((f"{path.relative_to(ROOT)}:{line}", body))
    return blocks


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, module, arguments)`` of every command line of the shell blocks."""
    commands = []
    for path in DOCUMENTS:
        text = path.read_text()
        for offset, body in fenced_blocks(text, ("bash", "console", "sh")):
            first_line = text[:offset].count("\n") + 2
            for number, line in enumerate(body.replace("\\\n", " ").splitlines()):
                tokens = shlex.split(line.removeprefix("$ "), comments=True)
                where = f"{path.relative_to(ROOT)}:{first_line + number}"
                for index, token in enumerate(tokens):
                    if token == "-m" and tokens[index + 1].startswith("experiments."):
                        module, rest = tokens[index + 1], tokens[index + 2 :]
                    elif token == "scripts/train.sh" and tokens[index - 1 : index] == ["bash"]:
                        module, rest = "experiments.train", tokens[index + 1 :]
                    else:
                        continue
                    ends = [i for i, t in enumerate(rest) if t in SHELL_OPERATORS]
                    commands.append((where, module, rest[: ends[0]] if ends else rest))
    return commands


def test_the_readme_is_a_front_door() -> None:
    """At most 10 KB; the rest is in docs/, CONTRIBUTING.md and BENCHMARKS.md, which it links."""
    text = README.read_text()
    assert len(text.encode()) <= 10 * 1024
    for linked in ("docs/model.md", "docs/results.md", "CONTRIBUTING.md", "BENCHMARKS.md"):
        assert f"]({linked})" in text, linked


def test_the_readmes_flax_example_runs() -> None:
    (where, code), *_ = executed_blocks()
    assert where.startswith("README.md:")
    namespace: dict = {}
    exec(compile(code, where, "exec"), namespace)
    assert namespace["y"].shape == (8, 16, 81)
    assert set(namespace["variables"]) == {"params", "batch_stats"}
    assert namespace["h"].shape == (1, 81)
    assert len(namespace["stack_variables"]["params"]) == 3


@pytest.mark.parametrize("where, code", executed_blocks()[1:], ids=lambda value: value)
def test_the_documents_examples_run(where: str, code: str) -> None:
    exec(compile(code, where, "exec"), {})


def test_the_documented_commands_parse() -> None:
    commands = documented_commands()
    assert {module for _, module, _ in commands} >= {
        "experiments.train",
        "experiments.evaluate",
        "experiments.predict",
        "experiments.sweep",
        "experiments.analyze_sweep",
        "experiments.results_table",
    }
    for where, module, arguments in commands:
        command = importlib.import_module(
            f"{module}.__main__" if module == "experiments.data" else module
        )
        try:
            command.build_parser().parse_args(arguments)
        except SystemExit as exit_:
            raise AssertionError(f"{where}: python -m {module} {shlex.join(arguments)}") from exit_
