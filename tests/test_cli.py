"""The command line: fast help, readable tables, seeds parsing, and one error line for a user's mistake."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from auxnb.__main__ import main, parse_seeds
from auxnb.info import METHODS, OVERRIDES

ENV = {**os.environ, "AUXNB_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "auxnb", *args], capture_output=True, text=True, env=env or ENV, timeout=120)


def test_help_does_not_import_torch():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['auxnb', 'run', '--help']\n"
        "try:\n    runpy.run_module('auxnb', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "grad_clip" in out.stdout  # the --set keys are listed in run --help


def test_run_help_lists_every_set_key_and_every_option_has_help():
    from auxnb.__main__ import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name}: option {action.dest} has no help text"
    text = sub.choices["run"].format_help()
    for key in OVERRIDES:
        assert key in text


def test_info_matches_the_registries():
    from auxnb import experiments, methods

    assert list(METHODS) == methods.names()
    assert experiments.OVERRIDES is OVERRIDES
    assert "grad_clip" in OVERRIDES


@pytest.mark.parametrize("text, seeds", [("0,1,2", [0, 1, 2]), ("0-4", [0, 1, 2, 3, 4]), ("0-2,5", [0, 1, 2, 5]),
                                         ("3", [3]), ("1,1,2", [1, 2])])
def test_seeds_parse_lists_ranges_and_mixes(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, words", [("3-1", "counts down"), ("a-b", "not a seed"), ("0-2,x", "not a seed"), ("", "no seeds")])
def test_bad_seeds_name_the_problem_and_the_form(text, words):
    with pytest.raises(argparse.ArgumentTypeError, match=words):
        parse_seeds(text)


def test_settings_and_methods_tables_fit_100_columns(capsys):
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    header = out.splitlines()[0].split()
    assert header == ["setting", "offline", "data", "reproduces"]
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line[:1].strip() and "offline=" not in line}
    assert rows["digits-rotation"] == "yes"  # sklearn's bundled digits always run offline
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "Chen et al., NeurIPS 2022" in out and "maoal" in out


def test_grad_clip_is_a_valid_set_key():
    from auxnb.experiments import resolve_config

    assert resolve_config("digits-rotation", "smoke", {"grad_clip": "1.5"})["grad_clip"] == 1.5
    assert resolve_config("digits-rotation", "smoke", {"grad_clip": "none"})["grad_clip"] is None
    with pytest.raises(ValueError, match="grad_clip"):
        resolve_config("digits-rotation", "smoke", {"grad_clip": "-1"})


def test_cuda_on_a_cpu_machine_is_one_error_line_with_the_cli_fix():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = _cli("run", "digits-rotation", "--scale", "smoke", "--no-progress", env={**ENV, "AUXNB_DEVICE": "cuda"})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "--device cpu" in out.stderr and "AUXNB_DEVICE=cpu" in out.stderr
