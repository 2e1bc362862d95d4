"""Checkpoints and sweeps that can be trusted: identity, safe loading, corrupt files, HPO trials, divergence, sweep faults.

(The SIGKILL fault injection for every method is in tests/test_faults.py.)
"""

import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import auxnb.experiments.core as core
from auxnb import checkpoint as ckpt_io
from auxnb import experiments
from auxnb.checkpoint import CheckpointError
from auxnb.data import TaskDataset, build_bundle
from auxnb.methods import Method, get
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import Task, TaskSet
from auxnb.train import Trainer, TrainingDiverged

SMOKE = dict(scale="smoke", progress=False, device="cpu", steps=4, eval_every=2)


def tiny(seed=0, n=120):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    a = (x[:, 2] > 0).long()
    tasks = TaskSet([Task("y", "classification", 4, primary=True), Task("a", "classification", 2)])
    bundle = build_bundle(TaskDataset(x, {"y": y, "a": a}), tasks, val_size=20, test_size=20, dev_size=8, seed=seed)
    torch.manual_seed(0)
    return bundle, MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)


def fit(method="equal", seed=0, split_seed=0, **kw):
    bundle, model = tiny(split_seed)
    args = dict(steps=6, eval_every=2, batch_size=16, seed=seed, device="cpu", progress=False)
    args.update(kw)
    return Trainer(model, method, bundle, **args).fit()


# --------------------------------------------------------------------------- encoding and random state
def test_numpy_values_round_trip_exactly_through_a_weights_only_checkpoint(tmp_path):
    value = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": np.float32(0.25), "c": [np.bool_(True), (1, "x")],
             "d": np.array(["u", "v"]), "t": torch.ones(2)}
    ckpt_io.save(tmp_path / "c.pt", {"v": value})
    back = ckpt_io.load(tmp_path / "c.pt")["v"]
    assert back["a"].dtype == np.int16 and np.array_equal(back["a"], value["a"])
    assert type(back["b"]) is np.float32 and back["b"] == value["b"]
    assert type(back["c"][0]) is np.bool_ and back["c"][1] == (1, "x")
    assert back["d"].tolist() == ["u", "v"] and torch.equal(back["t"], value["t"])
    # and the file itself loads with torch's safe loader
    torch.load(tmp_path / "c.pt", weights_only=True)


def test_method_generators_are_saved_by_name_and_continue_the_same_stream():
    class Holder:
        pass

    h = Holder()
    h._rng = torch.Generator().manual_seed(3)
    h._np_rng = np.random.default_rng(4)
    torch.rand(5, generator=h._rng), h._np_rng.random(5)
    saved = ckpt_io.decode(ckpt_io.encode(ckpt_io.generator_states(h)))
    expect = (torch.rand(3, generator=h._rng), h._np_rng.random(3))
    h2 = Holder()
    h2._rng, h2._np_rng = torch.Generator().manual_seed(99), np.random.default_rng(99)
    ckpt_io.restore_generators(h2, saved)
    assert torch.equal(torch.rand(3, generator=h2._rng), expect[0]) and np.array_equal(h2._np_rng.random(3), expect[1])


# --------------------------------------------------------------------------- identity
@pytest.mark.parametrize("change, named", [
    (dict(seed=1), "seed: 0 in the checkpoint, 1 now"),
    (dict(method="stl"), "method: 'equal' in the checkpoint, 'stl' now"),
    (dict(lr=0.5), "trainer.lr"),
    (dict(split_seed=1), "splits:"),
])
def test_resuming_a_different_run_is_refused_naming_what_differs(tmp_path, change, named):
    fit(checkpoint_dir=tmp_path)
    kwargs = {"checkpoint_dir": tmp_path, "resume": True, **change}
    with pytest.raises(CheckpointError, match="belongs to a different run") as err:
        fit(**kwargs)
    assert named in str(err.value) and "start fresh" in str(err.value)


def test_a_missing_checkpoint_with_resume_true_is_an_error_and_auto_starts_fresh(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in .*misspelled.*resume='auto'"):
        fit(checkpoint_dir=tmp_path / "typo", resume=True)
    fresh = fit(checkpoint_dir=tmp_path / "new", resume="auto")
    assert (tmp_path / "new" / "checkpoint.pt").exists()
    assert fresh.val_metric == fit().val_metric
    with pytest.raises(ValueError, match="resume must be"):
        fit(checkpoint_dir=tmp_path, resume="yes")


# --------------------------------------------------------------------------- corrupt and unsafe files
@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage"])
def test_a_corrupt_checkpoint_is_an_error_naming_the_file_and_the_remedy(tmp_path, kind):
    fit(checkpoint_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x80\x04not a checkpoint"}[kind])
    with pytest.raises(CheckpointError) as err:
        fit(checkpoint_dir=tmp_path, resume=True)
    assert str(path) in str(err.value) and "delete it" in str(err.value)


def test_a_checkpoint_holding_a_code_running_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    torch.save({"format": ckpt_io.FORMAT, "model": Evil()}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        fit(checkpoint_dir=tmp_path, resume=True)
    assert not marker.exists()


# --------------------------------------------------------------------------- HPO-tune trials
def test_hpo_tune_trials_each_have_their_own_checkpoint_and_match_a_run_without_checkpoints(tmp_path):
    hpo = dict(trials=3, seed=1)
    plain = fit(get("hpo-tune", **hpo))
    checked = fit(get("hpo-tune", **hpo), checkpoint_dir=tmp_path)
    # the bug of issue 17: trials 2 and 3 read trial 1's finished checkpoint and repeated its metric
    assert [t["val_metric"] for t in checked.trace_trials] == [t["val_metric"] for t in plain.trace_trials]
    # the search cost its three trials, and says so (the kept trial's own seconds stay apart)
    assert plain.timings["fits"] == 3 and plain.timings["total_s"] > plain.timings["run_total_s"] > 0
    assert sorted(p.parent.name for p in tmp_path.glob("*/checkpoint.pt")) == ["trial-000", "trial-001", "trial-002"]
    search = ckpt_io.load(tmp_path / "selection.pt")  # the selection layer's state (issue 23)
    assert [search["runs"][k]["status"] for k in sorted(search["runs"])] == ["done"] * 3
    resumed = fit(get("hpo-tune", **hpo), checkpoint_dir=tmp_path, resume=True)
    assert resumed.trace_trials == plain.trace_trials and resumed.val_metric == plain.val_metric
    with pytest.raises(CheckpointError, match="trials: 3 in the checkpoint, 4 now"):
        fit(get("hpo-tune", trials=4, seed=1), checkpoint_dir=tmp_path, resume=True)


# --------------------------------------------------------------------------- divergence and time
def test_the_divergence_guard_stops_an_exploding_run_naming_the_step_and_task():
    bundle, model = tiny()
    # lr 1e6 with SGD: the loss grows by orders of magnitude without (yet) being NaN
    with pytest.raises(TrainingDiverged, match=r"primary task 'y'.*lower step 4.*10 x its initial value"):
        Trainer(model, "stl", bundle, steps=8, eval_every=2, batch_size=16, optimizer="sgd", lr=1e3, momentum=0.0,
                seed=0, device="cpu", progress=False, divergence=(10, 2)).fit()
    quiet = fit("stl", divergence=(10, 2))  # a healthy run is untouched by the guard
    assert quiet.history.equals(quiet.history) and quiet.val_metric == fit("stl").val_metric
    with pytest.raises(ValueError, match="k > 1"):
        fit(divergence=(0.5, 2))


def test_wall_time_is_summed_over_the_resumed_parts(tmp_path):
    class Stop(Exception):
        pass

    def stop(event, info):
        if event == "eval" and info["step"] == 4:
            raise Stop

    with pytest.raises(Stop):
        fit(checkpoint_dir=tmp_path, callbacks=[stop])
    before = ckpt_io.load(tmp_path / "checkpoint.pt")["state"]["elapsed_s"]
    resumed = fit(checkpoint_dir=tmp_path, resume=True)
    assert before > 0 and resumed.timings["total_s"] > before
    assert resumed.history["seconds"].iloc[-1] > before


# --------------------------------------------------------------------------- sweeps
def _never_run(*args, **kwargs):
    raise AssertionError("a run started although the outputs were invalid")


@pytest.mark.parametrize("bad", ["missing-dir/t.csv", "a-directory", "ro/t.csv"])
def test_sweep_outputs_are_validated_before_the_first_run(tmp_path, monkeypatch, bad):
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    monkeypatch.setattr(core, "run", _never_run)
    if bad == "ro/t.csv" and __import__("os").access(tmp_path / "ro", __import__("os").W_OK):
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(ValueError, match="does not exist|is a directory|not writable"):
        experiments.sweep("digits-rotation", ["stl"], [0], out=tmp_path / bad, **SMOKE)
    (tmp_path / "ro").chmod(0o700)


def test_sweep_refuses_duplicate_seeds_and_methods(monkeypatch):
    monkeypatch.setattr(core, "run", _never_run)
    with pytest.raises(ValueError, match=r"Duplicate seeds \[0\]"):
        experiments.sweep("digits-rotation", ["stl"], [0, 0], **SMOKE)
    with pytest.raises(ValueError, match=r"Duplicate methods \['stl'\]"):
        experiments.sweep("digits-rotation", ["stl", "stl"], [0], **SMOKE)


def test_a_failing_run_is_a_failed_row_and_the_other_runs_go_on(tmp_path, monkeypatch):
    real, calls = core.run, []

    def flaky(setting, method, **kwargs):
        calls.append((method, kwargs["seed"]))
        if method == "equal" and kwargs["seed"] == 0:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(setting, method, **kwargs)

    monkeypatch.setattr(core, "run", flaky)
    with pytest.warns(core.SweepWarning, match=r"failed: RuntimeError.*\(after 2 attempts\)"):
        table = experiments.sweep("digits-rotation", ["equal", "stl"], [0, 1], out=tmp_path / "t.csv", retries=1, **SMOKE)
    assert calls.count(("equal", 0)) == 2 and len(calls) == 5
    failed = table[table.status == "failed"]
    assert failed[["method", "seed"]].values.tolist() == [["equal", 0]]
    assert "RuntimeError: CUDA out of memory" in failed.iloc[0]["error"] and math.isnan(failed.iloc[0]["test"])
    on_disk = pd.read_csv(tmp_path / "t.csv")
    assert on_disk.status.tolist() == ["failed", "ok", "ok", "ok"]
    summary = experiments.summarize(table)
    assert summary.set_index("method").loc["equal", "n"] == 1  # the failed run is not counted


@pytest.mark.parametrize("content", ["", "setting,method,seed,val,test\n", "\x00\x01garbage\n1,2\n3\n"], ids=["empty", "header-only", "garbage"])
def test_a_corrupt_per_run_file_is_named_and_re_run(tmp_path, content):
    first = experiments.sweep("digits-rotation", ["stl"], [0], out_dir=tmp_path, **SMOKE)
    (path,) = tmp_path.glob("*.csv")
    path.write_text(content)
    with pytest.warns(core.SweepWarning, match=f"{path.name} is .*re-running"):
        again = experiments.sweep("digits-rotation", ["stl"], [0], out_dir=tmp_path, **SMOKE)
    assert again["test"].tolist() == first["test"].tolist()
    assert pd.read_csv(path)["test"].tolist() == first["test"].tolist()


def test_the_per_run_file_name_depends_on_the_data_root(tmp_path):
    a = core._run_file(tmp_path, "s", "m", 0, "smoke", {}, tmp_path / "data-a")
    b = core._run_file(tmp_path, "s", "m", 0, "smoke", {}, tmp_path / "data-b")
    assert a != b and a == core._run_file(tmp_path, "s", "m", 0, "smoke", {}, tmp_path / "data-a")


def test_cli_resume_without_a_checkpoint_is_a_one_line_error_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "auxnb", "run", "digits-rotation", "--scale", "smoke", "--no-progress",
                           "--checkpoint-dir", str(tmp_path / "typo"), "--resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no checkpoint in" in proc.stderr and "--allow-fresh" in proc.stderr


def test_a_sweep_reports_a_diverged_run_as_failed_instead_of_a_chance_level_result():
    # SGD at lr 1e4 on digits: the loss explodes by 10^17 without reaching NaN; unguarded it would
    # be reported as a normal run at chance accuracy
    kwargs = dict(scale="smoke", progress=False, device="cpu", steps=8, eval_every=2, optimizer="sgd", lr=1e4, momentum=0.0)
    with pytest.warns(core.SweepWarning, match="Training diverged"):
        guarded = experiments.sweep("digits-rotation", ["stl"], [0], **kwargs)
    row = guarded.iloc[0]
    assert row["status"] == "failed" and math.isnan(row["test"])
    assert "primary task 'digit'" in row["error"] and "lower step 4" in row["error"]
    unguarded = experiments.sweep("digits-rotation", ["stl"], [0], divergence=None, **kwargs)
    assert unguarded.iloc[0]["status"] == "ok" and unguarded.iloc[0]["test"] < 0.2
