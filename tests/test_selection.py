"""The selection layer (issue 23): a Trainer trains one run; the do-no-harm guard and HPO-tune's
search train candidate runs through it and choose on D_val.

Truths used: the guard's rule on hand-picked D_val numbers; each candidate of a guarded run is
bit-identical to the same run trained on its own (same seed, same initial weights), so the kept
run is what the rule picks among separately trained runs; the resumed selection equals the
uninterrupted one; a folder of another run is refused, naming what differs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from helpers import Stop, stop_at_eval

from auxnb import _deprecation, selection
from auxnb.checkpoint import CheckpointError
from auxnb.data import TaskDataset, build_bundle
from auxnb.methods import JTDS, MAOAL, STL, without_guard
from auxnb.methods.guard import equal_fallback
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import Task, TaskSet
from auxnb.train import Trainer

TASKS = TaskSet([Task("y", "classification", 4, primary=True), Task("a", "classification", 2)])


def tiny(n=120):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    a = (x[:, 2] > 0).long()
    return build_bundle(TaskDataset(x, {"y": y, "a": a}), TASKS, val_size=20, test_size=20, dev_size=8, seed=0)


def model_fn():
    return MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), TASKS)


def fit(method, **kw):
    args = dict(steps=6, eval_every=2, batch_size=16, seed=0, device="cpu", progress=False)
    args.update(kw)
    return Trainer(model_fn, method, tiny(), **args).fit()


def small_maoal():
    return MAOAL(lower_steps=2, terms=1)


# --------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("vals, margin, kept", [
    ((0.80, 0.90), 0.0, "stl"), ((0.90, 0.80), 0.0, "maoal"), ((0.85, 0.85), 0.0, "stl"),  # a tie: the simpler run
    ((0.900, 0.896), 0.005, "stl"), ((0.900, 0.894), 0.005, "maoal"),  # kept only when ahead by > margin
    ((math.nan, 0.5), 0.0, "stl"), ((0.5, math.nan), 0.0, "maoal"),  # a NaN D_val never wins
])
def test_the_stl_guard_keeps_the_method_only_when_it_beats_stl_on_validation_by_more_than_the_margin(vals, margin, kept):
    assert selection.select(vals[0], {"stl": vals[1]}, margin=margin, method_name="maoal") == kept


@pytest.mark.parametrize("vals, kept", [
    ((0.8, 0.9, 0.95), "equal"), ((0.8, 0.9, 0.85), "stl"), ((0.9, 0.9, 0.9), "stl"), ((0.91, 0.9, 0.9), "jtds"),
    ((0.903, 0.9, 0.9), "stl"),  # the method within the margin of STL
    ((0.906, 0.9, 0.904), "jtds"),  # Equal within the margin of STL: STL stays; the method beats STL by 0.006
    ((0.92, 0.9, 0.93), "equal"),  # Equal beats STL; the method does not beat Equal
])
def test_the_three_way_guard_keeps_the_simplest_run_that_no_more_complex_run_beats_by_the_margin(vals, kept):
    assert selection.select(vals[0], {"stl": vals[1], "equal": vals[2]}, margin=0.005, method_name="jtds") == kept


def test_guard_values_and_the_auto_default_are_checked_and_resolved_per_method():
    assert [selection.resolve_guard("auto", m) for m in ("maoal", "jtds", "dtg", "gcs", "stl")] == ["stl+equal"] * 3 + [None] * 2
    assert selection.resolve_guard("none", "maoal") is None and selection.resolve_guard("stl", "gcs") == "stl"
    with pytest.raises(ValueError, match="guard must be None"):
        selection.check_guard("equal")
    with pytest.raises(ValueError, match="guard_margin must be"):
        Trainer(model_fn, "stl", tiny(), guard="stl", guard_margin=-0.1)
    # the candidates as they train (the method first), as the rule reads them (simplest first); a method
    # that is a candidate is not trained twice
    assert list(selection.guard_candidates(JTDS(), "stl+equal")) == ["jtds", "stl", "equal"]
    assert selection.simplest_first(["jtds", "stl", "equal"]) == ["stl", "equal", "jtds"]
    assert list(selection.guard_candidates(STL(), "stl+equal")) == ["stl", "equal"]


# --------------------------------------------------------------------------- the Trainer trains one run
def test_a_trainer_given_maoal_trains_maoal_alone_and_a_guarded_one_keeps_what_the_rule_picks_among_separate_runs():
    alone = fit(small_maoal())
    assert alone.config["method"] == "maoal" and "selection" not in alone.config and alone.candidates == {}
    assert alone.phi and "fits" not in alone.timings
    stl, equal = fit("stl"), fit(equal_fallback(small_maoal()))
    guarded = fit(small_maoal(), guard="stl+equal", guard_margin=0.0)
    # each candidate is the run it would be on its own: same seed, same initial weights, bit for bit
    for name, own in (("maoal", alone), ("stl", stl), ("equal", equal)):
        cand = guarded.candidates[name]
        assert (cand.val_metric, cand.test_metric, cand.best_step) == (own.val_metric, own.test_metric, own.best_step)
        assert cand.history.drop(columns="seconds").equals(own.history.drop(columns="seconds"))
    kept = selection.select(alone.val_metric, {"stl": stl.val_metric, "equal": equal.val_metric}, method_name="maoal")
    info = guarded.config["selection"]
    assert info["kept"] == kept and info["val"] == {"maoal": alone.val_metric, "stl": stl.val_metric, "equal": equal.val_metric}
    assert guarded.test_metric == guarded.candidates[kept].test_metric
    # the learned φ stays with the method's own candidate, whatever was kept
    assert guarded.candidates["maoal"].phi.keys() == alone.phi.keys()
    # the result costs all three trainings; the model holds the kept run's best weights
    assert guarded.timings["fits"] == 3
    assert guarded.timings["total_s"] == pytest.approx(sum(c.timings["total_s"] for c in guarded.candidates.values()))
    torch.testing.assert_close({k: v.detach().cpu() for k, v in guarded.model.state_dict().items()}, guarded.candidates[kept].weights)
    # the line the CLI prints, by hand from the D_val numbers
    others = ", ".join(f"{k} {v:.4f}" for k, v in info["val"].items() if k != kept)
    assert selection.describe(guarded) == f"kept {kept}: val {info['val'][kept]:.4f} ({others}; margin 0)"
    assert selection.describe(alone) is None


def test_old_fallback_keywords_and_without_guard_warn_once_and_map_onto_the_run_level_guard():
    _deprecation._WARNED.clear()
    with pytest.warns(FutureWarning, match="guard is a run-level option"):
        old = MAOAL(lower_steps=2, terms=1, fallback="stl", fallback_margin=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        JTDS(fallback=None)  # once per process: no second warning
    new = fit(small_maoal(), guard="stl", guard_margin=0.0)
    via_old = fit(old)
    assert via_old.config["selection"] == new.config["selection"] and via_old.test_metric == new.test_metric
    with pytest.warns(FutureWarning, match="without_guard"):
        assert without_guard("jtds") == {"fallback": None}
    with pytest.raises(ValueError, match="fallback must be None"):
        JTDS(fallback="equal")


def test_run_guards_maoal_by_default_and_not_with_guard_none_or_the_old_fallback_none():
    from auxnb.experiments import run

    kw = dict(seed=0, scale="smoke", device="cpu", progress=False, steps=4, eval_every=2)
    guarded = run("digits-rotation", "jtds", **kw)
    assert list(guarded.candidates) == ["jtds", "stl", "equal"] and guarded.config["selection"]["guard"] == "stl+equal"
    alone = run("digits-rotation", "jtds", guard=None, **kw)
    assert "selection" not in alone.config and alone.val_metric == guarded.candidates["jtds"].val_metric
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = run("digits-rotation", "jtds", method_kwargs={"fallback": None}, **kw)
    assert "selection" not in old.config and old.test_metric == alone.test_metric
    assert "selection" not in run("digits-rotation", "gcs", **kw).config  # auto: only MAOAL, JTDS, DTG


def test_hpo_tune_is_a_search_in_the_selection_layer_keeping_the_best_validation_trial():
    from auxnb.methods import FixedWeights, HPOTune

    hpo = HPOTune(trials=3, seed=1)
    result = fit(hpo)
    weights = hpo.candidates(["a"])
    trials = [fit(FixedWeights(w)) for w in weights]
    best = max(range(3), key=lambda i: trials[i].val_metric)
    assert [t["val_metric"] for t in result.trace_trials] == [t.val_metric for t in trials]
    assert result.config["selection"]["kept"] == f"trial-{best:03d}" and result.test_metric == trials[best].test_metric
    assert result.config["hpo_best_weights"] == weights[best]


# --------------------------------------------------------------------------- resumable
def test_resuming_a_guarded_run_from_a_single_runs_folder_or_the_other_way_round_is_refused_naming_the_difference(tmp_path):
    single, guarded = tmp_path / "single", tmp_path / "guarded"
    fit("stl", checkpoint_dir=single)
    with pytest.raises(CheckpointError, match=r"single run of 'stl' \(no selection.pt\), not that of a guarded run of 'maoal'.*"
                                              r"belongs to a different run \(.*method: 'stl' in the checkpoint, 'maoal' now"):
        fit(small_maoal(), guard="stl+equal", checkpoint_dir=single, resume=True)
    fit(small_maoal(), guard="stl", checkpoint_dir=guarded)
    with pytest.raises(CheckpointError, match=r"guard='stl'.*not those of this single run of 'maoal'"):
        fit(small_maoal(), checkpoint_dir=guarded, resume=True)
    with pytest.raises(CheckpointError, match=r"guard: 'stl' in the checkpoint, 'stl\+equal' now"):
        fit(small_maoal(), guard="stl+equal", checkpoint_dir=guarded, resume=True)


@pytest.mark.parametrize("kind", ["single", "guarded", "search"])
def test_resume_with_nothing_to_resume_is_an_error_for_every_run_kind(tmp_path, kind):
    method, kw = {"single": ("stl", {}), "guarded": (small_maoal(), {"guard": "stl+equal"}),
                  "search": ("hpo-tune", {})}[kind]
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(method, checkpoint_dir=tmp_path / "empty", resume=True, **kw)


def test_a_guarded_run_stopped_inside_its_second_candidate_resumes_to_the_uninterrupted_result(tmp_path):
    stop_in_stl = stop_at_eval(5)  # maoal: 3 evaluations; the second of stl's
    reference = fit(small_maoal(), guard="stl+equal")
    with pytest.raises(Stop):
        fit(small_maoal(), guard="stl+equal", checkpoint_dir=tmp_path, callbacks=[stop_in_stl])
    state = selection.ckpt_io.load(tmp_path / selection.STATE_FILE)
    assert state["runs"]["maoal"]["status"] == "done" and state["runs"]["stl"]["status"] == "running"
    assert "equal" not in state["runs"]
    resumed = fit(small_maoal(), guard="stl+equal", checkpoint_dir=tmp_path, resume=True)
    assert resumed.config["selection"] == reference.config["selection"]
    for name in ("stl", "equal", "maoal"):
        a, b = reference.candidates[name], resumed.candidates[name]
        assert (a.val_metric, a.test_metric, a.best_step) == (b.val_metric, b.test_metric, b.best_step)
        assert a.history.drop(columns="seconds").equals(b.history.drop(columns="seconds"))


# --------------------------------------------------------------------------- cheaper: reuse
def test_a_sweep_reuses_its_stl_and_equal_rows_as_the_guards_candidates_and_gets_the_same_row(monkeypatch):
    from auxnb import experiments, train

    kw = dict(scale="smoke", device="cpu", progress=False, steps=4, eval_every=2)
    alone = experiments.run("digits-rotation", "jtds", guard="stl+equal", **kw)  # trains its three candidates itself
    steps = {"n": 0}
    real = train._check_finite

    def count(terms, step):  # once per lower step
        steps["n"] += 1
        real(terms, step)

    monkeypatch.setattr(train, "_check_finite", count)
    table = experiments.sweep("digits-rotation", ["jtds", "stl", "equal"], seeds=[0], guard="auto", **kw).set_index("method")
    assert steps["n"] == 3 * 4  # jtds, stl and equal once each: the guard trained no second STL or Equal
    assert list(table.index) == ["jtds", "stl", "equal"]  # the table keeps the order asked for
    assert (table.loc["jtds", "val"], table.loc["jtds", "test"], table.loc["jtds", "kept"]) == (
        alone.val_metric, alone.test_metric, alone.config["selection"]["kept"])
    assert table.loc["stl", "val"] == alone.candidates["stl"].val_metric
    assert table.loc["equal", "val"] == alone.candidates["equal"].val_metric


def test_a_run_that_is_not_exactly_the_candidates_is_never_reused():
    other_seed = fit("stl", seed=1)
    same = fit("stl")
    guarded = fit(small_maoal(), guard="stl", reuse={"stl": other_seed})
    assert guarded.config["selection"]["reused"] == [] and guarded.timings["fits"] == 2
    assert guarded.candidates["stl"].val_metric == same.val_metric
    reused = fit(small_maoal(), guard="stl", reuse={"stl": same})
    assert reused.config["selection"]["reused"] == ["stl"] and reused.timings["fits"] == 1
    assert reused.config["selection"]["val"] == guarded.config["selection"]["val"]
    # the Equal candidate of a method with its own auxiliary tasks is not the plain Equal run
    assert "aux_tasks" in equal_fallback(MAOAL(aux_tasks=["a"])).config()


# --------------------------------------------------------------------------- cheaper: lockstep
def test_candidates_trained_in_lockstep_are_bit_identical_to_their_runs_trained_one_after_another():
    sequential = fit(small_maoal(), guard="stl+equal", steps=8, lr=0.02)
    lockstep = fit(small_maoal(), guard="stl+equal", steps=8, lr=0.02, guard_drop=1.0)  # a bound nothing trails by
    assert lockstep.config["selection"]["dropped"] == {}
    for name, run in sequential.candidates.items():
        other = lockstep.candidates[name]
        assert (other.val_metric, other.test_metric, other.best_step) == (run.val_metric, run.test_metric, run.best_step)
        assert other.history.drop(columns="seconds").equals(run.history.drop(columns="seconds"))
    assert lockstep.config["selection"]["kept"] == sequential.config["selection"]["kept"]


def test_a_candidate_trailing_the_leader_by_more_than_the_bound_in_the_second_half_stops_there():
    full = fit(small_maoal(), guard="stl+equal", steps=8, lr=0.02)
    metric = f"val_{full.metric_name}"
    # by hand from the full runs: evaluations at 2, 4, 6, 8; the first at or after half the run is step 4
    at4 = {k: float(r.history[r.history.step <= 4][metric].max()) for k, r in full.candidates.items()}  # best so far
    leader = max(at4, key=at4.get)
    expect = sorted(k for k, v in at4.items() if at4[leader] - v > 0.0)
    assert expect  # lr 0.02: STL leads at step 4, MAOAL and Equal trail (the case is not vacuous)
    out = fit(small_maoal(), guard="stl+equal", steps=8, lr=0.02, guard_drop=0.0)
    assert sorted(out.config["selection"]["dropped"]) == expect
    for name, cand in out.candidates.items():
        ref = full.candidates[name].history.drop(columns="seconds")
        mine = cand.history.drop(columns="seconds")
        if name in expect:  # stopped at step 4: its history is the full run's up to there, bit for bit
            assert out.config["selection"]["dropped"][name] == 4 and mine.equals(ref[ref.step <= 4].reset_index(drop=True))
        else:
            assert mine.equals(ref)
    with pytest.raises(ValueError, match="guard_drop must be"):
        fit("stl", guard_drop=-1)
    assert selection.drop_bound("auto", 0.01, 0.5, 200, "accuracy") == pytest.approx(0.01 + 2 * (2 * 0.25 / 200) ** 0.5)


def test_a_lockstep_guard_stopped_midway_resumes_to_the_uninterrupted_result(tmp_path):
    stop = stop_at_eval(8)  # STL's last evaluation, after MAOAL and Equal were dropped at step 4
    reference = fit(small_maoal(), guard="stl+equal", steps=8, lr=0.02, guard_drop=0.0)
    with pytest.raises(Stop):
        fit(small_maoal(), guard="stl+equal", steps=8, lr=0.02, guard_drop=0.0, checkpoint_dir=tmp_path, callbacks=[stop])
    resumed = fit(small_maoal(), guard="stl+equal", steps=8, lr=0.02, guard_drop=0.0, checkpoint_dir=tmp_path, resume=True)
    assert reference.config["selection"]["dropped"]  # the stop came after a candidate was dropped
    assert resumed.config["selection"] == reference.config["selection"]
    for name, a in reference.candidates.items():
        b = resumed.candidates[name]
        assert (a.val_metric, a.test_metric, a.best_step) == (b.val_metric, b.test_metric, b.best_step)
        assert a.history.drop(columns="seconds").equals(b.history.drop(columns="seconds"))


# --------------------------------------------------------------------------- the CLI
def test_the_cli_prints_what_a_guarded_run_kept_and_refuses_another_runs_folder_without_a_traceback(tmp_path, capsys):
    from auxnb.__main__ import main
    from auxnb.experiments import run

    args = ["digits-rotation", "--scale", "smoke", "--no-progress", "--set", "steps=4", "--set", "eval_every=2"]
    assert main(["run", *args, "--method", "jtds"]) == 0
    printed = capsys.readouterr().out.splitlines()
    same = run("digits-rotation", "jtds", scale="smoke", progress=False, steps=4, eval_every=2)
    info = same.config["selection"]
    others = ", ".join(f"{k} {v:.4f}" for k, v in info["val"].items() if k != info["kept"])
    assert printed[-1] == f"kept {info['kept']}: val {info['val'][info['kept']]:.4f} ({others}; margin 0.01)"
    assert main(["run", *args, "--method", "jtds", "--guard", "none"]) == 0
    assert not any(line.startswith("kept ") for line in capsys.readouterr().out.splitlines())
    # the case: an STL run's folder, then a guarded MAOAL run told to resume from it
    ck = str(tmp_path / "ck")
    assert main(["run", *args, "--method", "stl", "--checkpoint-dir", ck]) == 0
    capsys.readouterr()
    assert main(["run", *args, "--method", "maoal", "--checkpoint-dir", ck, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "single run of 'stl'" in err and "Traceback" not in err
    assert main(["run", *args, "--method", "maoal", "--guard-drop", "soon"]) == 2
    assert "--guard-drop" in capsys.readouterr().err
