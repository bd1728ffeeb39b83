"""The documentation agrees with the code: example config, commands and options, systemd units, metrics.

Pure and fast: nothing here connects to Ceph or runs a command.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbd2qcow2.cli.parser import build_parser
from rbd2qcow2.core import errors
from rbd2qcow2.ops import config

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
EXAMPLE = DOCS / "examples" / "rbd2qcow2.toml"
SERVICE = DOCS / "systemd" / "rbd2qcow2.service"
TIMER = DOCS / "systemd" / "rbd2qcow2.timer"
USAGE = DOCS / "usage.md"
OPERATIONS = DOCS / "operations.md"
# Markdown files whose command lines are checked against the parser.
COMMAND_DOCS = (USAGE, OPERATIONS, DOCS / "disaster-recovery.md")

# `rbd2qcow2 COMMAND`, also as a path (/usr/local/bin/rbd2qcow2), not rbd2qcow2.service or rbd2qcow2_claim.
INVOCATION = re.compile(r"(?:^|(?<=[\s/`$(]))rbd2qcow2[ \t]+([a-z][a-z0-9-]*)")
# Where a command's arguments end on its line (a synopsis' raw|qcow2 is not a pipe).
ARGS_END = re.compile(r"\s#|\s[|>]|[;&)`]|\$\(")
OPTION = re.compile(r"^(--[a-z][a-z0-9-]*|-[A-Za-z])(?:=.*)?$")


# -- helpers ------------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI parser has no subcommands")


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def code_fragments(text: str) -> Iterator[list[str]]:
    """Command-like text of a markdown file: indented or fenced code lines, and inline code spans.

    Each fragment is a list of lines; an indented code line is followed by the
    lines that continue its synopsis (more indented, starting with ``[``).
    """
    lines = text.splitlines()
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            indent = len(line) - len(line.lstrip())
            more = []
            for nxt in lines[i + 1 :]:
                if len(nxt) - len(nxt.lstrip()) > indent and nxt.lstrip().startswith("["):
                    more.append(nxt)
                else:
                    break
            yield [line, *more]
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield [span]


def invocations(path: Path) -> Iterator[tuple[str, list[str], str]]:
    """Every ``rbd2qcow2 COMMAND ARGS`` in a markdown file: command, argument tokens, source line."""
    for fragment in code_fragments(path.read_text()):
        first, *more = fragment
        for match in INVOCATION.finditer(first):
            rest = first[match.end() :]
            end = ARGS_END.search(rest)
            tokens = rest[: end.start()] if end else rest
            if end is None:
                tokens += " " + " ".join(more)
            yield match.group(1), [t.strip("[]") for t in tokens.split()], first.strip()


def unit_file(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as section -> [(key, value)] (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def metric_names() -> list[str]:
    """The metric names of ``report.METRICS``, read from the source (cli/report.py imports the Ceph bindings)."""
    tree = ast.parse((REPO / "rbd2qcow2" / "cli" / "report.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "METRICS" for t in node.targets):
            value = ast.literal_eval(node.value)
            return [entry[0] for entry in value]
    raise AssertionError("report.py has no METRICS")


def error_exit_codes() -> set[int]:
    codes: set[int] = set()
    todo: list[type[errors.Error]] = [errors.Error]
    while todo:
        cls = todo.pop()
        codes.add(cls.exit_code)
        todo += cls.__subclasses__()
    return codes


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# -- the example configuration ------------------------------------------------------------


def test_example_config_loads() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.target.is_absolute()
    assert cfg.clusters and all(c.pools for c in cfg.clusters)
    assert cfg.retention is not None and not cfg.retention.empty


def test_example_config_uses_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key the parser asks for appears in the example (tables compared without their indexes)."""
    asked: dict[str, set[str]] = {}
    given: dict[str, set[str]] = {}
    original = config.Table.done

    def done(table: config.Table) -> None:
        where = re.sub(r"\[\d+\]", "", table.where) or "(top level)"
        asked.setdefault(where, set()).update(table.used)
        given.setdefault(where, set()).update(table.raw)
        original(table)

    monkeypatch.setattr(config.Table, "done", done)
    config.load(EXAMPLE)
    missing = {where: sorted(asked[where] - given[where]) for where in asked if asked[where] - given[where]}
    assert not missing, f"keys the schema accepts but {EXAMPLE.name} does not show: {missing}"
    assert {"(top level)", "clusters", "clusters.pools", "retention", "verify"} <= set(asked)


# -- commands and options in the markdown files -------------------------------------------


def test_every_command_has_a_section_in_usage() -> None:
    headings = set(re.findall(r"^## (\S+)\s*$", USAGE.read_text(), re.MULTILINE))
    missing = sorted(set(subcommands()) - headings)
    assert not missing, f"docs/usage.md has no section for: {missing}"


@pytest.mark.parametrize("path", COMMAND_DOCS, ids=lambda p: p.name)
def test_documented_commands_and_options_exist(path: Path) -> None:
    commands = subcommands()
    found = list(invocations(path))
    assert found, f"no rbd2qcow2 command in {path.name}"
    problems = []
    for command, tokens, line in found:
        if command not in commands:
            problems.append(f"unknown command {command!r}: {line}")
            continue
        known = option_strings(commands[command])
        for token in tokens:
            match = OPTION.match(token)
            if match and match.group(1) not in known:
                problems.append(f"{command}: unknown option {match.group(1)}: {line}")
    assert not problems, "\n".join(problems)


def test_usage_names_every_command() -> None:
    named = {command for command, _, _ in invocations(USAGE)}
    assert set(subcommands()) <= named


@pytest.mark.parametrize("path", [USAGE, OPERATIONS], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.MULTILINE)}
            if anchor not in anchors:
                problems.append(f"{target}: no such heading")
    assert not problems, "\n".join(problems)


# -- operations guide ---------------------------------------------------------------------


def test_operations_names_the_metrics_exactly() -> None:
    text = OPERATIONS.read_text()
    names = metric_names()
    missing = [n for n in names if not re.search(rf"\b{n}\b", text)]
    assert not missing, f"metrics not documented: {missing}"
    mentioned = set(re.findall(r"\brbd2qcow2_[a-z_]+", text)) - {"rbd2qcow2_claim"}
    unknown = sorted(mentioned - set(names))
    assert not unknown, f"operations.md names metrics that cli/report.py does not write: {unknown}"


def test_operations_exit_code_table_is_complete() -> None:
    listed: set[int] = set()
    for row in re.findall(r"^\|\s*([0-9][0-9, ]*?)\s*\|", OPERATIONS.read_text(), re.MULTILINE):
        listed |= {int(c) for c in row.split(",")}
    required = error_exit_codes() | {0, 70, 130, 143}
    assert required <= listed, f"exit codes missing from operations.md: {sorted(required - listed)}"


# -- systemd units ------------------------------------------------------------------------


def test_service_runs_the_nightly_job() -> None:
    unit = unit_file(SERVICE)
    assert values(unit, "Service", "Type") == ["oneshot"]
    [exec_start] = values(unit, "Service", "ExecStart")
    assert "rbd2qcow2 run --config" in exec_start
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "rbd2qcow2"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.config.name == EXAMPLE.name and args.metrics is not None
    assert values(unit, "Service", "KillSignal") == ["SIGTERM"]
    assert not values(unit, "Service", "SuccessExitStatus")  # a failed run must fail the unit
    # The hardened unit can still write the target and the metrics file's directory.
    writable = {p.lstrip("-") for v in values(unit, "Service", "ReadWritePaths") for p in v.split()}
    assert str(config.load(EXAMPLE).target) in writable
    assert str(args.metrics.parent) in writable
    assert values(unit, "Service", "ProtectSystem") == ["strict"]


def test_timer_starts_it_nightly() -> None:
    unit = unit_file(TIMER)
    assert values(unit, "Timer", "OnCalendar") == ["*-*-* 01:30"]
    assert values(unit, "Timer", "Persistent") == ["true"]
    assert values(unit, "Timer", "RandomizedDelaySec")
    assert values(unit, "Install", "WantedBy") == ["timers.target"]
    assert SERVICE.stem == TIMER.stem  # a timer starts the service of its own name
