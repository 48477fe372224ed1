"""The ``kaleido`` CLI: help, config printing, and one-line errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

import yaml

from kaleido_bert.cli import main


def test_help_lists_the_subcommands(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "data", "config"):
        assert command in out


def test_config_show_applies_overrides(capsys):
    assert main(["config", "show", "--config", "tiny", "--set", "train.lr=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 0.5 and shown["model"]["hidden_size"] == 32


def test_bad_override_gives_one_line_and_exit_2(capsys):
    assert main(["config", "show", "--config", "tiny", "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.nope" in err and "\n" not in err


def test_console_script_runs_as_a_process():
    result = subprocess.run(
        [sys.executable, "-m", "kaleido_bert.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "kaleido-bert" in result.stdout
