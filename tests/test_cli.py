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


def test_settings_and_methods_tables_fit_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    header = out.splitlines()[0].split()
    assert header == ["setting", "offline", "data", "reproduces"]
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line[:1].strip() and "offline=" not in line}
    assert rows["digits-rotation"] == "yes"  # sklearn's bundled digits always run offline
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "Chen et al., NeurIPS 2022" in out and "maoal" in out


HELP_AND_LISTINGS = [["--help"], ["settings"], ["methods"]] + [
    [name, "--help"] for name in ("settings", "methods", "run", "sweep", "plan")
]


@pytest.mark.parametrize("columns", [80, 60])
@pytest.mark.parametrize("argv", HELP_AND_LISTINGS, ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_every_help_and_listing_fits_the_terminal_width(argv, columns):
    out = _cli(*argv, env={**ENV, "COLUMNS": str(columns)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines, "no output"
    too_wide = [line for line in lines if len(line) > columns]
    assert not too_wide, f"{len(too_wide)} line(s) wider than {columns}: {too_wide[:3]}"


def test_output_off_a_terminal_is_80_columns_wide():
    env = {k: v for k, v in ENV.items() if k != "COLUMNS"}  # stdout is a pipe here, not a TTY
    out = _cli("methods", env=env)
    widths = [len(line) for line in out.stdout.splitlines()]
    assert max(widths) <= 80 and max(widths) >= 70  # wrapped to 80, not to some narrower guess


def test_a_wrapped_table_keeps_every_word_of_every_cell_in_order():
    from auxnb.cli_format import table

    rows = [{"name": "a" * 3, "text": "one two three four five six seven eight nine ten " * 3, "x": "k" * 30},
            {"name": "b", "text": "short", "x": "y"}]
    text = table(rows, cols=40)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 40
    first = lines[2:lines.index(next(line for line in lines[3:] if line.startswith("b")))]
    # the columns' spans, from the dashes under the header
    import re

    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    assert len(spans) == 3
    # each column's cells, read down the first row, give back the original text
    for (lo, hi), key in zip(spans, ("name", "text", "x")):
        cell = "".join(line[lo:hi].strip() + " " for line in first).split()
        assert "".join(cell) == rows[0][key].replace(" ", "")
        assert cell == rows[0][key].split() or key == "x"  # words wrap whole; a long word is split


def test_plan_help_states_the_default_scale_plan_uses(monkeypatch):
    from auxnb.__main__ import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["plan"].format_help().split())
    assert "default: paper" in text
    assert "paper with CUDA and small without" not in text  # that is run's default, not plan's
    args = parser.parse_args(["plan", "maoal-table1"])
    assert args.scale is None  # _cmd_plan turns None into "paper" (scale=args.scale or "paper")
    import inspect

    from auxnb.__main__ import _cmd_plan

    assert 'args.scale or "paper"' in inspect.getsource(_cmd_plan)


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_run_and_sweep_help_state_their_own_default_scale_not_plans(command):
    """argparse's parents share their option objects: plan rewriting its --scale help must not change
    what run and sweep say, whose default is $AUXNB_SCALE, else paper with CUDA and small without
    (`auxnb.experiments.default_scale`)."""
    from auxnb.__main__ import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices[command].format_help().split())
    assert "default: $AUXNB_SCALE, else paper with CUDA and small without" in text
    assert "the scale whose protocol is estimated" not in text


def test_run_prints_one_block_with_data_source_tasks_method_configuration_and_metrics():
    out = _cli("run", "digits-rotation", "--method", "equal", "--scale", "smoke", "--no-progress",
               env={**ENV, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    labels = [line.split()[0] for line in text.splitlines() if line[:1].strip()]
    assert labels == ["run", "data", "tasks", "training", "method", "result"]
    assert "real data: sklearn digits + rotation" in text
    assert "digit (primary, classification, 10 classes" in text and "rotation (auxiliary" in text
    assert "1 CPU thread" in " ".join(text.split())
    assert "equal:" in text and "val_accuracy=" in text and "test_accuracy=" in text


def test_run_block_says_generated_fixture_files_when_the_data_were_synthetic():
    from types import SimpleNamespace

    from auxnb.cli_format import run_block

    config = {"device": "cpu", "scale": "smoke", "data_source": "FIXTURE: generated files (fashion-mnist)",
              "fixture": True, "data": {"train": 40, "dev": 10, "val": 20, "test": 20}, "method": "stl",
              "method_config": {"uses_dev": False}, "steps": 4}
    result = SimpleNamespace(config=config, tasks=None, metric_name="accuracy", val_metric=0.5,
                             test_metric=0.25, best_step=4, timings={"total_s": 1.0})
    text = run_block(result, setting="fashion-rotation", method="stl", seed=0, cols=80)
    assert "GENERATED FIXTURE FILES, not the real dataset" in text
    assert "real data:" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


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


def test_a_table_too_wide_for_the_terminal_becomes_one_block_per_row_with_every_value():
    import pandas as pd

    from auxnb.cli_format import frame_table

    frame = pd.DataFrame([{f"column_{i}": f"value-{r}-{i}" for i in range(12)} for r in range(3)])
    text = frame_table(frame, cols=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    for r in range(3):
        for i in range(12):
            key = f"column_{i}"
            assert (f"{key}=value-{r}-{i}" in " ".join(text.split())) or (i < 2 and f"value-{r}-{i}" in text)
    narrow = pd.DataFrame([{"a": "1", "b": "2"}])
    assert frame_table(narrow, cols=80).splitlines()[0].split() == ["a", "b"]  # a table when it fits
