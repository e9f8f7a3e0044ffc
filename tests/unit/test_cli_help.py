"""`xbl`'s help: every option of every command says what it does, the choices are listed, and
`--version` answers without loading torch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from flows import cli

REPO = Path(__file__).resolve().parents[2]


def _parsers(parser: argparse.ArgumentParser, path: str = "xbl"):
    """(name, parser) for `parser` and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def _commands(parser: argparse.ArgumentParser):
    """(parent, subcommand, its help line) for every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            yield from ((parser.prog, name, helps.get(name)) for name in action.choices)


ALL_PARSERS = [
    *_parsers(cli.build_parser()),
    ("xbl webhook", cli._webhook_parser()),
    ("xbl webhook register", cli._register_parser()),
]


@pytest.mark.parametrize("name,parser", ALL_PARSERS, ids=[name for name, _ in ALL_PARSERS])
def test_every_option_and_command_has_help(name, parser):
    undocumented = [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction)
        and (not a.help or a.help == argparse.SUPPRESS or not a.help.strip())
    ]
    assert not undocumented, f"{name}: no help for {undocumented}"
    silent = [f"{parent} {sub}" for parent, sub, text in _commands(parser) if not text]
    assert not silent, f"commands without help: {silent}"


def _help_of(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_demo_lists_its_datasets():
    demos = sorted(p.stem for p in (REPO / "demos").glob("*.yaml"))
    assert demos  # the repository ships demos: an empty list would pass vacuously
    dataset = _option(cli.build_parser(), "demo", "--dataset")
    assert sorted(dataset.choices) == demos
    assert "{" + ",".join(demos) + "}" in _help_of("demo")


def test_round_takes_a_wait_mode_from_the_configs_choices():
    mode = _option(cli.build_parser(), "round", "--wait-mode")
    assert tuple(mode.choices) == ("block", "resume")
    args = cli.build_parser().parse_args(["round", "--wait-mode", "resume"])
    assert args.wait_mode == "resume"
    assert cli.build_parser().parse_args(["round"]).wait_mode is None  # params.yaml decides
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["round", "--wait-mode", "never"])


def test_round_hands_the_wait_mode_to_the_flow(tmp_path, monkeypatch):
    from flows import loop

    (tmp_path / "params.yaml").write_text("wait:\n  mode: block\n")
    called = []

    def flow(project, params_file, wait_mode=None):
        called.append(wait_mode)
        return {"status": "waiting", "round": 1, "annotated": 0, "total": 5, "what": "answers"}

    monkeypatch.setattr(loop, "feedback_round_flow", flow)
    assert cli.main(["--project", str(tmp_path), "round", "--wait-mode", "resume"]) == 0
    assert cli.main(["--project", str(tmp_path), "round"]) == 0
    assert called == ["resume", None]


def _option(parser: argparse.ArgumentParser, command: str, flag: str) -> argparse.Action:
    sub = dict(_parsers(parser))[f"xbl {command}"]
    return next(a for a in sub._actions if flag in a.option_strings)


def test_version_is_the_installed_packages_and_loads_no_torch():
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['xbl', '--version']\n"
        "try:\n"
        "    runpy.run_module('flows.cli', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'mlflow' in sys.modules, 'prefect' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    version, loaded = done.stdout.splitlines()
    assert version == f"xbl {metadata.version('xbl')}"
    assert loaded == "False False False"


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch):
    import tomllib

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert cli.package_version() == pyproject["project"]["version"]


PRINT_PREFECT_HOME = """
import os
from flows import cli
cli.main = lambda: 0  # only what `xbl` does before the command runs
cli.console()
print(os.environ["PREFECT_HOME"])
"""


@pytest.mark.parametrize("given", [None, "/somewhere/else"])
def test_xbl_keeps_prefect_runs_where_make_and_the_server_do(given, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}
    if given:
        env["PREFECT_HOME"] = given
    out = subprocess.run(
        [sys.executable, "-c", PRINT_PREFECT_HOME], cwd=tmp_path, env=env,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == (given or str(REPO / ".prefect"))
