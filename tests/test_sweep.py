"""`sweep` takes what `run` takes (issue 23, item 6): labelled cases with their own overrides,
labelled methods, configured methods, and the runs' own results, so that the chapters use one
`sweep` call instead of a hand-written settings × methods × seeds loop of `run`.

Truth used: a sweep row is the run `run` trains with the same arguments, so the same seed gives
bit-identical metrics and histories; each test builds the chapter-style loop by hand with `run`
and compares it with the `sweep` call that replaces it in the chapter."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import auxnb
from auxnb.experiments import run, sweep
from auxnb.experiments import core
from auxnb.methods import MAOAL

FAST = dict(steps=6, eval_every=3)
KW = dict(scale="smoke", device="cpu", progress=False)


def _same_run(row, result):
    assert (row["val"], row["test"], row["best_step"]) == (result.val_metric, result.test_metric, result.best_step)


def test_a_sweep_of_labelled_cases_gives_the_run_loops_metrics_bit_for_bit():
    # chapter 14: one setting at two label-noise rates, each case its own row label
    cases = {f"noise {r}": ("fashion-rotation", {"label_noise": r}) for r in (0.2, 0.5)}
    table, runs = sweep(cases, ["stl", "jtds"], seeds=[0], return_runs=True, **KW, **FAST)
    assert list(zip(table.setting, table.method)) == [("noise 0.2", "stl"), ("noise 0.2", "jtds"),
                                                      ("noise 0.5", "stl"), ("noise 0.5", "jtds")]
    for _, row in table.iterrows():
        rate = 0.2 if row.setting == "noise 0.2" else 0.5
        alone = run("fashion-rotation", row.method, seed=0, guard=None, label_noise=rate, **KW, **FAST)
        _same_run(row, alone)
        kept = runs[row.setting, row.method, 0]
        _same_run(row, kept)
        # the returned result is that run's, curves included (wall-clock seconds aside)
        pd.testing.assert_frame_equal(kept.history.drop(columns="seconds"), alone.history.drop(columns="seconds"))
        assert kept.config["overrides"]["label_noise"] == rate


def test_cases_of_other_settings_with_their_own_budgets_match_the_loop():
    # chapters 5 and 13: cases of two settings, each with its own overrides (shots, dev_size, steps)
    cases = {"rotation 2-shot": ("digits-rotation", {"shots": 2, "dev_size": 4, **FAST}),
             "mnist 20%": ("digits-mnist", {"label_fraction": 0.2, "steps": 4, "eval_every": 2})}
    table = sweep(cases, "stl", seeds=[0, 1], **KW)
    for _, row in table.iterrows():
        name, own = cases[row.setting]
        _same_run(row, run(name, "stl", seed=row.seed, guard=None, **own, **KW))


def test_labelled_name_and_kwargs_entries_run_as_method_kwargs_on_the_settings_defaults():
    # chapter 4: two JTDS configurations side by side, each labelled, kwargs on top of the setting's defaults
    # (no warm-up: JTDS's default 40 lower steps without φ updates are longer than these runs)
    entries = [("STL", ("stl", {})), ("JTDS (probe 16)", ("jtds", {"probe_size": 16, "warmup": 0})),
               ("JTDS (batch-mean)", ("jtds", {"probe_size": 16, "normalize": "batch_mean", "hyper_lr": 1.0, "warmup": 0,
                                              "lower_steps": 2, "upper_optimizer": "adam", "upper_lr": 0.1}))]
    table = sweep("digits-rotation", entries, seeds=[0], label_noise=0.4, **KW, **FAST)
    assert table.method.tolist() == ["STL", "JTDS (probe 16)", "JTDS (batch-mean)"]
    for (label, (name, kwargs)), (_, row) in zip(entries, table.iterrows()):
        _same_run(row, run("digits-rotation", name, seed=0, guard=None, method_kwargs=kwargs, label_noise=0.4, **KW, **FAST))
    # the two configurations differ: the labels are not two copies of one run
    assert table.loc[1, "test"] != table.loc[2, "test"] or table.loc[1, "val"] != table.loc[2, "val"]


def test_configured_methods_in_a_sweep_match_the_loop_and_are_not_shared_between_runs():
    # chapter 3: MAOAL as the paper's text states it and a configured AuxL, on two seeds
    maoal, auxl = MAOAL.paper_text("cub-semi"), auxnb.methods.get("auxl", lower_steps=3)
    table, runs = sweep("digits-rotation", [maoal, auxl, "stl"], seeds=[0, 1], return_runs=True, label_fraction=0.2, **KW, **FAST)
    assert list(runs) == list(zip(table.setting, table.method, table.seed))  # the runs come in the table's order
    for _, row in table.iterrows():
        method = {"maoal": MAOAL.paper_text("cub-semi"), "auxl": auxnb.methods.get("auxl", lower_steps=3), "stl": "stl"}[row.method]
        alone = run("digits-rotation", method, seed=row.seed, guard=None, label_fraction=0.2, **KW, **FAST)
        _same_run(row, alone)
        assert runs["digits-rotation", row.method, row.seed].phi.keys() == alone.phi.keys()


def test_a_case_override_also_given_to_the_whole_sweep_is_refused_before_any_run(monkeypatch):
    monkeypatch.setattr(core, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=r"label_noise.*case 'a'.*one place"):
        sweep({"a": ("fashion-rotation", {"label_noise": 0.2})}, "stl", seeds=[0], label_noise=0.5, **KW)
    with pytest.raises(TypeError, match=r"Case 'a' .*setting name or \(name, overrides\)"):
        sweep({"a": ("fashion-rotation", 0.2)}, "stl", seeds=[0], **KW)
    with pytest.raises(ValueError, match="Override label_noise=1.5"):  # a case's bad override: before the first run
        sweep({"a": ("fashion-rotation", {"label_noise": 0.2}), "b": ("fashion-rotation", {"label_noise": 1.5})},
              "stl", seeds=[0], **KW)
    with pytest.raises(TypeError, match=r"\(label, \(name, kwargs\)\)"):
        sweep("fashion-rotation", [("x", ("stl", 3))], seeds=[0], **KW)


def test_return_runs_needs_the_runs_in_this_process(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ValueError, match="return_runs=True .*executor='local' and no out_dir"):
        sweep("digits-rotation", "stl", seeds=[0], return_runs=True, out_dir=tmp_path, **KW)
    with pytest.raises(ValueError, match="return_runs=True .*executor='local'"):
        sweep("digits-rotation", "stl", seeds=[0], return_runs=True, executor="processes", jobs=1, **KW)


def test_labelled_cases_resume_from_their_own_per_run_files(tmp_path, monkeypatch):
    cases = {"20% labels": ("digits-rotation", {"label_fraction": 0.2}), "50% labels": ("digits-rotation", {"label_fraction": 0.5})}
    first = sweep(cases, [("STL (plain)", "stl")], seeds=[0], out_dir=tmp_path, **KW, **FAST)
    assert len(list(tmp_path.glob("*.csv"))) == 2  # one file per case: the label, not the setting, names a run
    assert first.test.notna().all()
    assert (first.loc[0, "val"], first.loc[0, "test"]) != (first.loc[1, "val"], first.loc[1, "test"])  # two protocols, two runs
    monkeypatch.setattr(core, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = sweep(cases, [("STL (plain)", "stl")], seeds=[0], out_dir=tmp_path, **KW, **FAST)
    pd.testing.assert_frame_equal(first[["setting", "method", "seed", "val", "test"]], again[["setting", "method", "seed", "val", "test"]])
    assert not any(math.isnan(v) for v in again.test)
