"""The command line (``python -m transact_jax``): user errors are one line with exit status 2,
``--debug`` shows the traceback, every option has help, and ``--help`` answers at once."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List

import pytest

from transact_jax.__main__ import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP_SECONDS = 3.0   # well under 1 s on a quiet 2-core CPU; loose for a loaded CI machine


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m transact_jax ARGS`` from the repository root (importable without installing)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "transact_jax", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return lines[-1]


def subparsers(parser: argparse.ArgumentParser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_is_fast_and_plain_text():
    times = []
    for _ in range(2):   # the first run may pay for a cold disk cache
        t0 = time.perf_counter()
        proc = run_cli("--help")
        times.append(time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr
    print(f"--help: {min(times):.2f} s")
    assert min(times) < HELP_SECONDS
    for command in subparsers(build_parser()):
        assert command in proc.stdout
    assert "``" not in proc.stdout and ":class:" not in proc.stdout   # not the reST docstring


def test_help_does_not_import_jax():
    proc = subprocess.run([sys.executable, "-c", "import sys; from transact_jax.__main__ import main\n"
                           "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                           "print('jax' in sys.modules, 'flax' in sys.modules, file=sys.stderr)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stderr.strip().splitlines()[-1] == "False False", proc.stderr


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    for name, sub in {"": parser, **subparsers(parser)}.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"{name} {action.dest}"
            assert action.help, where
            if action.option_strings and action.nargs != 0 and not action.required:
                assert "(default: " in formatter._expand_help(action), where


@pytest.mark.parametrize("command", ["generate", "train", "evaluate", "presets", "data"])
def test_command_help_exits_0(command: str):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m transact_jax {command}")


@pytest.mark.parametrize("args,expect", [
    (["generate", "--out", "unused", "--train-users", "-5"], "--train-users: must be >= 1, got -5"),
    (["generate", "--out", "unused", "--eval-users", "x"], "--eval-users: expected an integer"),
    (["train", "--data", "d", "--workdir", "w", "--steps", "0"], "--steps: must be >= 1"),
    (["data", "movielens", "--file", "f", "--out", "o", "--negatives", "-1"], "must be >= 0"),
    ([], "required: COMMAND"),
])
def test_usage_errors_are_one_line(args: List[str], expect: str):
    assert expect in assert_one_line_error(run_cli(*args))


def test_missing_data_is_one_line(tmp_path):
    line = assert_one_line_error(run_cli("train", "--data", str(tmp_path / "nonexistent"),
                                         "--workdir", str(tmp_path / "run")))
    assert "nonexistent" in line


@pytest.fixture
def bad_config(tmp_path) -> str:
    path = tmp_path / "bad.json"
    path.write_text('{"train": {"stepz": 3}}')
    return str(path)


def test_bad_config_is_one_line_and_debug_shows_the_traceback(tmp_path, bad_config):
    args = ["generate", "--out", str(tmp_path / "out"), "--config", bad_config]
    line = assert_one_line_error(run_cli(*args))
    assert "stepz" in line and "bad.json" in line
    debug = run_cli("--debug", *args)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError" in debug.stderr
    assert not (tmp_path / "out").exists()
