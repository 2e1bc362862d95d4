"""experiments.plan (issue 14): table -> runs, a probe per (setting, method), per-row missing data."""

from __future__ import annotations

import math

import pytest

from auxnb import experiments
from auxnb.experiments.plan import plan, table_runs


def test_table_runs_follow_the_reproduces_tags():
    settings, methods = table_runs("jtds-table2")
    assert settings and all("jtds-table2" in experiments.get_setting(s).reproduces for s in settings)
    tagged = [r.setting for r in experiments.settings().itertuples() if "jtds-table2" in r.reproduces]
    assert sorted(settings) == sorted(tagged)
    assert {"stl", "jtds", "n-jtds"} <= set(methods)  # the published rows, as registry names
    with pytest.raises(ValueError, match="No setting reproduces \\[maoal-table9\\].*maoal-table1"):
        table_runs("maoal-table9")


def test_plan_probes_each_pair_and_reports_missing_data_per_row(tmp_path):
    out = plan(settings=["movielens100k-l2", "digits-rotation"], methods=["stl", "maoal"], seeds=2, scale="small",
               probe_steps=2, data_root=tmp_path, isolate=False, device="cpu")
    assert list(out[["setting", "method"]].itertuples(index=False, name=None)) == [
        ("movielens100k-l2", "stl"), ("movielens100k-l2", "maoal"), ("digits-rotation", "stl"), ("digits-rotation", "maoal")]
    assert (out["runs"] == 2).all() and (out["note"] == "").all()
    assert (out["s_per_step"] > 0).all()
    # an empty data root: the MovieLens rows say so, the bundled digits do not; nothing is fatal
    assert out.loc[0, "data"].startswith("missing") and out.loc[2, "data"] == "ok"
    # the bundled digits are counted, not looked up: 1,797 images − 300 val − 500 test − 50 dev = 947
    # training images, 15 batches of 64 per epoch, 20 epochs at small scale
    assert (out.loc[2:3, "steps_per_run"] == 20 * 15).all()
    for r in out.itertuples():
        if not math.isnan(r.hours_sequential):
            assert r.hours_sequential == pytest.approx(r.s_per_step * r.steps_per_run * r.runs / 3600)
    assert out.attrs["hours_sequential"] == pytest.approx(out["hours_sequential"].sum())
    assert out.attrs["hours_packed"] == pytest.approx(out.attrs["hours_sequential"] / out.attrs["slots"])


def test_plan_needs_a_table_or_lists():
    with pytest.raises(ValueError, match="paper table id"):
        plan(settings=["digits-rotation"])


def test_cli_plan_prints_the_table_and_totals(tmp_path, capsys):
    from auxnb.__main__ import main

    out = tmp_path / "plan.csv"
    assert main(["plan", "--settings", "movielens100k-l2", "--methods", "stl", "--scale", "smoke", "--probe-steps", "1",
                 "--device", "cpu", "--data-root", str(tmp_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "movielens100k-l2" in text and "total: 3 runs" in text and "missing (movielens-100k)" in text
    assert out.is_file()
    assert main(["plan", "--settings", "digits-rotation"]) == 2  # a user mistake: message, no traceback


def test_plan_charges_every_training_of_a_run(monkeypatch):
    """HPO-tune's trials and the do-no-harm guard's STL and Equal runs are part of one run's cost.

    Each training's timings are fixed by hand (seconds over the probe's 2 steps), so the expected
    seconds per step are computed here, not measured: a bi-level run's upper steps are charged
    1/T of their probed cost (the probe takes one after every lower step)."""
    import types

    import pandas as pd

    from auxnb.methods import STL, FixedWeights, MAOAL
    from auxnb.train import RunResult, Trainer

    def fake_fit(self, method, key=None):
        if isinstance(method, MAOAL):
            timings = {"lower_s": 3.0, "upper_s": 6.0}
        elif isinstance(method, STL):
            timings = {"lower_s": 1.0, "upper_s": 0.0}
        else:  # FixedWeights: Equal, an HPO-tune trial
            assert isinstance(method, FixedWeights)
            timings = {"lower_s": 2.0, "upper_s": 0.0}
        timings["total_s"] = timings["lower_s"] + timings["upper_s"]
        # a RunResult: the selection layer (issue 23) keeps one and gives the model its weights back
        return RunResult(val_metric=0.5, test_metric=0.5, metric_name="accuracy", history=pd.DataFrame(), trace=[],
                         config={"method": method.name}, seed=0, timings=timings, best_step=2,
                         weights={k: v.detach().clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(Trainer, "_fit", fake_fit)
    t = 3  # MAOAL's recommended lower_steps
    out = plan(settings=["digits-rotation"], methods=["maoal", "hpo-tune", "equal"], seeds=1, scale="small",
               probe_steps=2, isolate=False, device="cpu")
    assert (out["note"] == "").all(), out["note"].tolist()
    row = out.set_index("method")
    # guarded MAOAL (the default): its own run (1.5 + 3/T per step), then STL (0.5) and Equal (1.0)
    assert row.loc["maoal", "fits"] == 3
    assert row.loc["maoal", "s_per_step"] == pytest.approx(1.5 + 3.0 / t + 0.5 + 1.0)
    # HPO-tune: its 8 trials of 1.0 s per step each
    assert row.loc["hpo-tune", "fits"] == 8
    assert row.loc["hpo-tune", "s_per_step"] == pytest.approx(8 * 1.0)
    assert row.loc["equal", "fits"] == 1 and row.loc["equal", "s_per_step"] == pytest.approx(1.0)


def test_a_jtds_probe_times_its_upper_steps_despite_the_default_warm_up(monkeypatch):
    """JTDS() waits 40 lower steps before its first upper step (issue 22); a 2-step probe would see none
    and charge it nothing for its upper level. The probe times the upper steps that follow the warm-up."""
    from auxnb.methods import JTDS
    from auxnb.train import Trainer

    assert JTDS().warmup > 2  # the premise: the default warm-up is longer than the probe
    seen = []
    real_fit = Trainer._fit

    def recording_fit(self, *args, **kwargs):
        result = real_fit(self, *args, **kwargs)
        method = args[0] if args else kwargs.get("method")
        if isinstance(method, JTDS):
            seen.append(dict(result.trace[-1]))  # the method's state at the probe's last step
        return result

    monkeypatch.setattr(Trainer, "_fit", recording_fit)
    out = plan(settings=["digits-rotation"], methods=["jtds"], seeds=1, scale="small", probe_steps=2,
               isolate=False, device="cpu")
    assert out.set_index("method").loc["jtds", "note"] == ""
    # the JTDS run's last upper step computed a hypergradient (during a warm-up it would say "warmup")
    assert len(seen) == 1 and "upper/hypergrad_norm" in seen[0] and "upper/warmup" not in seen[0], seen
