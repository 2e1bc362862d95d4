"""The Trainer: determinism, exact resume, selection on val with a single test read, clear failures."""

import math
import subprocess
import sys

import pytest
import torch

import auxnb.train as train_module
from auxnb import experiments, methods
from auxnb.data import TaskDataset, build_bundle
from auxnb.methods import Method
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import Task, TaskSet
from auxnb.train import Trainer

SMOKE = dict(scale="smoke", progress=False, device="cpu")


def _tiny_bundle(n=120, seed=0, nan_at=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    if nan_at is not None:
        x[nan_at] = float("nan")
    tasks = TaskSet([Task("y", "classification", 4, primary=True)])
    return build_bundle(TaskDataset(x, {"y": y}), tasks, val_size=20, test_size=20, dev_size=8, seed=seed), tasks


def test_same_seed_gives_same_metrics_and_history():
    a = experiments.run("digits-rotation", "equal", seed=3, **SMOKE)
    b = experiments.run("digits-rotation", "equal", seed=3, **SMOKE)
    assert (a.val_metric, a.test_metric, a.best_step) == (b.val_metric, b.test_metric, b.best_step)
    cols = [c for c in a.history.columns if c != "seconds"]
    assert a.history[cols].equals(b.history[cols])


def test_different_seeds_give_different_runs():
    a = experiments.run("digits-rotation", "stl", seed=0, **SMOKE)
    b = experiments.run("digits-rotation", "stl", seed=1, **SMOKE)
    assert not a.history["train_loss/digit"].equals(b.history["train_loss/digit"])


class _Stop(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    kwargs = dict(epochs=4, eval_every=10, **SMOKE)
    full = experiments.run("digits-rotation", "uncert", seed=1, **kwargs)

    def interrupt(event, info):
        if event == "eval" and info["step"] == 20:
            raise _Stop

    with pytest.raises(_Stop):
        experiments.run("digits-rotation", "uncert", seed=1, checkpoint_dir=tmp_path, callbacks=[interrupt], **kwargs)
    evals = []
    resumed = experiments.run("digits-rotation", "uncert", seed=1, checkpoint_dir=tmp_path, resume=True,
                              callbacks=[lambda e, i: evals.append(i["step"]) if e == "eval" else None], **kwargs)
    assert evals[0] == 30  # it continued from the checkpoint at step 20 instead of starting over
    assert (resumed.val_metric, resumed.test_metric, resumed.best_step) == (full.val_metric, full.test_metric, full.best_step)
    cols = [c for c in full.history.columns if c != "seconds"]
    assert resumed.history[cols].equals(full.history[cols])
    assert [t["log_var/rotation"] for t in resumed.trace] == [t["log_var/rotation"] for t in full.trace]


def test_test_split_is_evaluated_exactly_once_at_the_best_val_checkpoint(monkeypatch):
    bundle, tasks = _tiny_bundle()
    seen = []
    real = train_module.evaluate

    def counting(model, dataset, *args, **kwargs):
        out = real(model, dataset, *args, **kwargs)
        seen.append((dataset is bundle.test, out["metric"]))
        return out

    monkeypatch.setattr(train_module, "evaluate", counting)
    model = MultiHeadModel.for_tasks(MLP(6, hidden=(16,)), tasks)
    result = Trainer(model, "stl", bundle, epochs=6, batch_size=16, device="cpu", progress=False, eval_every=3).fit()
    assert sum(is_test for is_test, _ in seen) == 1
    history = result.history
    best_row = history.loc[history["step"] == result.best_step].iloc[0]
    assert best_row["val_accuracy"] == history["val_accuracy"].max()
    assert result.val_metric == pytest.approx(best_row["val_accuracy"])


def test_single_level_methods_train_on_train_and_dev():
    result = experiments.run("digits-rotation", "stl", **SMOKE)
    data = result.config["data"]
    assert data["dev"] in (0, None) and data["train"] == 997  # 1797 - 300 val - 500 test


def test_nan_loss_stops_with_step_and_task_named():
    bundle, tasks = _tiny_bundle(nan_at=5)
    model = MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)
    with pytest.raises(FloatingPointError, match=r"task 'y' at lower step \d+"):
        Trainer(model, "stl", bundle, epochs=2, batch_size=16, device="cpu", progress=False).fit()


class _NeedsDev(Method):
    name = "needs-dev"
    uses_dev = True


def test_bilevel_method_without_dev_split_is_a_clear_error():
    with pytest.raises(ValueError, match="empty dev split"):
        experiments.run("digits-rotation", _NeedsDev(), dev_size=0, **SMOKE)


def test_unknown_setting_and_method_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid settings: .*digits-rotation"):
        experiments.run("nope", "stl", **SMOKE)
    with pytest.raises(ValueError, match="valid methods: .*stl"):
        experiments.run("digits-rotation", "nope", **SMOKE)


def test_override_with_wrong_type_or_unknown_key_is_a_clear_error():
    with pytest.raises(TypeError, match="label_fraction.*expected float"):
        experiments.run("digits-rotation", "stl", label_fraction="lots", **SMOKE)
    with pytest.raises(ValueError, match="Unknown override 'lr_rate'"):
        experiments.run("digits-rotation", "stl", lr_rate=0.1, **SMOKE)
    with pytest.raises(ValueError, match="label_fraction"):
        experiments.run("digits-rotation", "stl", label_fraction=1.5, **SMOKE)


def test_label_out_of_range_is_a_clear_error():
    x = torch.randn(50, 3)
    tasks = TaskSet([Task("y", "classification", 3, primary=True)])
    with pytest.raises(ValueError, match="label 7 is out of range"):
        build_bundle(TaskDataset(x, {"y": torch.full((50,), 7)}), tasks, val_size=10, test_size=10, dev_size=0, stratify=False)


def test_hpo_tune_selects_the_best_trial_on_val():
    # each trial re-run on its own as FixedWeights: the independent truth the selection is checked against
    from auxnb.methods import FixedWeights

    result = experiments.run("digits-rotation", "hpo-tune", method_kwargs={"trials": 3}, steps=6, **SMOKE)
    candidates = methods.get("hpo-tune", trials=3).candidates(["rotation"])
    alone = [experiments.run("digits-rotation", FixedWeights(w), steps=6, **SMOKE) for w in candidates]
    vals = [r.val_metric for r in alone]
    best = max(range(3), key=lambda i: vals[i])
    assert [t["val_metric"] for t in result.trace_trials] == pytest.approx(vals)
    assert result.config["hpo_best_weights"] == candidates[best]
    assert result.val_metric == pytest.approx(vals[best]) and result.test_metric == pytest.approx(alone[best].test_metric)
    # the model the three trials trained in turn ends with the best trial's weights, not the last trial's
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    torch.testing.assert_close(state, alone[best].weights)


def test_label_fraction_override_reaches_the_data():
    result = experiments.run("digits-rotation", "stl", label_fraction=0.1, **SMOKE)
    data = result.config["data"]
    assert data["train_labelled"] == pytest.approx(100, abs=10)  # 10% of 997 per class, rounded per class


def test_cli_run_prints_val_and_test_and_rejects_unknown_method():
    ok = subprocess.run([sys.executable, "-m", "auxnb", "run", "digits-rotation", "--method", "stl",
                         "--scale", "smoke", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "val_accuracy=" in ok.stdout and "test_accuracy=" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "auxnb", "run", "digits-rotation", "--method", "nope",
                          "--scale", "smoke"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "valid methods" in bad.stderr


def test_sweep_resumes_from_finished_runs(tmp_path):
    first = experiments.sweep("digits-rotation", ["stl"], [0, 1], scale="smoke", out_dir=tmp_path, progress=False, device="cpu")
    files = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert [f.split("__smoke-")[0] for f in files] == ["digits-rotation__stl__seed0", "digits-rotation__stl__seed1"]
    (tmp_path / files[1]).unlink()  # as if the run for seed 1 had been killed
    again = experiments.sweep("digits-rotation", ["stl"], [0, 1], scale="smoke", out_dir=tmp_path, progress=False, device="cpu")
    assert again["test"].tolist() == pytest.approx(first["test"].tolist())
    # other overrides are another protocol: nothing is reused
    experiments.sweep("digits-rotation", ["stl"], [0], scale="smoke", out_dir=tmp_path, progress=False, device="cpu", label_fraction=0.5)
    assert len(list(tmp_path.glob("*.csv"))) == 3


def test_summarize_matches_hand_computed_mean_and_sample_std():
    import pandas as pd

    table = pd.DataFrame({"setting": ["s"] * 3, "method": ["m"] * 3, "test": [0.90, 0.92, 0.97]})
    row = experiments.summarize(table).iloc[0]
    mean = (0.90 + 0.92 + 0.97) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in (0.90, 0.92, 0.97)) / 2)
    assert row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(std) and row["n"] == 3
    assert row["mean ± std"] == f"{mean * 100:.2f} ± {std * 100:.2f}"


class _OverflowOnce(Method):
    """STL whose direction overflows (inf) on chosen calls: what an fp16 loss scale that is too large does."""

    name = "overflow-once"

    def __init__(self, bad_calls):
        self.bad_calls, self.calls, self.scales = set(bad_calls), 0, []

    def direction(self, terms, params, *, create_graph=False):
        grads = super().direction(terms, params, create_graph=create_graph)
        self.calls += 1
        if self.calls in self.bad_calls:
            grads = tuple(torch.full_like(g, math.inf) for g in grads)
        return grads


def test_fp16_loss_scale_skips_an_overflowing_step_and_halves_the_scale(tmp_path):
    # the Trainer's own dynamic loss scale (issue 8 fix: torch's GradScaler asserted on update):
    # an overflowing step changes no parameter and halves the scale; a finite one steps as usual
    bundle, tasks = _tiny_bundle()
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    snapshots = []
    trainer = Trainer(model, _OverflowOnce({1, 3}), bundle, steps=3, eval_every=1, batch_size=16, amp="fp16",
                      optimizer="sgd", lr=0.1, seed=0, device="cpu", progress=False, checkpoint_dir=tmp_path,
                      callbacks=[lambda ev, info: snapshots.append(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
                                 if ev == "eval" else None])
    trainer.fit()
    # every step is evaluated, an overflowing one too (it just changes nothing)
    saved = {int(s["state"]["step"]): s for s in snapshots}
    assert sorted(saved) == [1, 2, 3]
    assert [saved[k]["state"]["loss_scale"] for k in (1, 2, 3)] == [2.0**15, 2.0**15, 2.0**14]
    assert [saved[k]["state"]["good_steps"] for k in (1, 2, 3)] == [0, 1, 0]
    for k in start:  # step 1 overflowed: the model is exactly as initialised
        assert torch.equal(start[k], saved[1]["model"][k])
    changed = [k for k in start if not torch.equal(start[k], saved[2]["model"][k])]
    assert changed  # the finite step 2 moved it
    for k in start:  # step 3 overflowed: nothing moved
        assert torch.equal(saved[2]["model"][k], saved[3]["model"][k])


@pytest.mark.parametrize("method,kwargs", [
    ("equal", {}), ("uncert", {}), ("dtg", {"init_weight": 1.0}), ("mixup", {}), ("f-mixup", {}),
    ("auto-mix", {}), ("maxl", {}), ("maoal", {}), ("gcs", {}), ("auxl", {"kind": "nonlinear"}), ("jtds", {}),
])
def test_fp16_loss_scale_scales_the_whole_objective_so_steps_equal_the_unscaled_run(method, kwargs):
    # issue 12 defect 3: the scale multiplied terms.losses only, then divided the direction, so
    # every loss outside terms.losses (DTG's generated loss, MixUp's mixed loss, MAXL's head loss,
    # Uncert's log-variance term, a nonlinear AuxL combination) came out divided by the scale.
    # On CPU in float64 autocast(fp16) leaves every op alone, so amp="fp16" exercises the loss
    # scaling only: its steps must equal the unscaled run's.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    tasks = TaskSet([Task("y", "classification", 4, primary=True), Task("a", "classification", 2)])
    bundle = build_bundle(TaskDataset(x, {"y": y, "a": (x[:, 2] > 0).long()}), tasks, val_size=16, test_size=16,
                          dev_size=8, seed=0)
    states, initial = [], None
    for amp in (None, "fp16"):
        torch.manual_seed(0)
        model = MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks).double()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        extra = {"lower_steps": 1, "terms": 1} if name_is_bilevel(method) else {}
        Trainer(model, methods.get(method, **kwargs, **extra), bundle, steps=2, eval_every=2, batch_size=16,
                optimizer="sgd", lr=0.5, amp=amp, seed=0, device="cpu", progress=False).fit()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert any(not torch.equal(states[0][k], initial[k]) for k in initial)  # the steps moved θ
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], rtol=1e-9, atol=1e-12), k


def name_is_bilevel(name):
    from auxnb.methods.bilevel import BilevelMethod

    return issubclass(methods._REGISTRY[name], BilevelMethod)


def test_scaled_direction_equals_the_direction_for_a_method_that_does_not_apply_the_scale():
    # a third-party method whose direction ignores Method.scaled is not divided by a scale it never applied
    class Plain(Method):
        name = "plain"

        def direction(self, terms, params, *, create_graph=False):
            return torch.autograd.grad(terms.mean(terms.primary), list(params))

    bundle, tasks = _tiny_bundle()
    model = MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)
    from auxnb.methods import compute_terms

    batch = {"primary": bundle.train.gather(torch.arange(16))}
    params = list(model.parameters())
    plain = Plain()
    expected = plain.direction(compute_terms(model, batch, tasks), params)
    got = train_module.scaled_direction(plain, compute_terms(model, batch, tasks), params, 1024.0)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    equal = train_module.scaled_direction(Method(), compute_terms(model, batch, tasks), params, 1024.0)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(expected, equal))


def test_upper_objective_on_training_data_is_a_primary_only_batch_through_the_eval_transform():
    # issue 12 defect 7: with upper_data="train" the upper objective's batch went through the training
    # pipeline: augmentation applied and the Different-Input stream advanced for nothing
    from auxnb.data import DataBundle

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=g)
    x[:, 5] = 0.0  # column 5 marks the stream a batch came from: 0 primary, 1 auxiliary dataset
    aux_x = torch.randn(40, 6, generator=g)
    aux_x[:, 5] = 1.0
    tasks = TaskSet([Task("y", "classification", 2, primary=True), Task("other", "classification", 2, stream="other")])
    data = TaskDataset(x, {"y": (x[:, 0] > 0).long()})
    seen = []

    def record(kind):
        def transform(batch):
            seen.append((kind, "aux" if bool((batch[:, 5] == 1).all()) else "primary"))
            return batch

        return transform

    bundle = DataBundle(tasks, data.subset(range(48)), dev=data.subset(range(48, 56)), val=data.subset(range(56, 68)),
                        test=data.subset(range(68, 80)), aux_train={"other": TaskDataset(aux_x, {"other": (aux_x[:, 1] > 0).long()})},
                        transform=record("train"), eval_transform=record("eval"))
    counts = {}
    for name in ("equal", "auto-f-mix"):  # the same run without and with the two upper steps
        seen.clear()
        method = methods.get(name, **({"lower_steps": 1, "terms": 1, "upper_data": "train"} if name != "equal" else {}))
        uppers = []
        Trainer(MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks), method, bundle, steps=2, eval_every=2, batch_size=8,
                progress=False, device="cpu", callbacks=[lambda e, i: uppers.append(i) if e == "upper" else None]).fit()
        counts[name] = {key: seen.count(key) for key in [(k, s) for k in ("train", "eval") for s in ("primary", "aux")]}
    assert len(uppers) == 2
    extra = {key: counts["auto-f-mix"][key] - counts["equal"][key] for key in counts["equal"]}
    # what the 2 upper steps drew: g(θ, φ)'s batches through the training pipeline (primary and
    # auxiliary), and the upper objective's 2 primary-only batches through the eval transform
    assert extra == {("train", "primary"): 2, ("train", "aux"): 2, ("eval", "primary"): 2, ("eval", "aux"): 0}


# --------------------------------------------------------------------------- sweep takes what run takes (issue 23)
def test_a_sweep_of_configured_methods_gives_the_rows_of_the_same_runs_made_one_by_one(tmp_path):
    from auxnb.methods import JTDS, FixedWeights

    kw = dict(steps=4, eval_every=2, guard=None, **SMOKE)
    table = experiments.sweep(
        "digits-rotation", ["stl", ("jtds", {"lower_steps": 2}), ("half", FixedWeights({"rotation": 0.5}))],
        seeds=[0, 1], out_dir=tmp_path / "runs", **kw,
    ).set_index(["method", "seed"])
    for seed in (0, 1):
        # each run made on its own, with a fresh method object: the configured method is copied per run
        alone = {"stl": experiments.run("digits-rotation", "stl", seed=seed, **kw),
                 "jtds": experiments.run("digits-rotation", JTDS(lower_steps=2), seed=seed, **kw),
                 "half": experiments.run("digits-rotation", FixedWeights({"rotation": 0.5}), seed=seed, **kw)}
        for label, result in alone.items():
            assert (table.loc[(label, seed), "val"], table.loc[(label, seed), "test"]) == (result.val_metric, result.test_metric)
    # another configuration of the same label never reuses a per-run file
    files = sorted(p.name for p in (tmp_path / "runs").glob("*__jtds__seed0__*.csv"))
    experiments.sweep("digits-rotation", [("jtds", {"lower_steps": 3})], seeds=[0], out_dir=tmp_path / "runs", **kw)
    assert len(sorted(p.name for p in (tmp_path / "runs").glob("*__jtds__seed0__*.csv"))) == len(files) + 1


def test_a_sweeps_methods_are_checked_before_any_run():
    from auxnb.methods import MAOAL

    with pytest.raises(ValueError, match=r"Duplicate methods \['maoal'\].*label them"):
        experiments.sweep("digits-rotation", ["maoal", MAOAL(lower_steps=2)], seeds=[0], **SMOKE)
    with pytest.raises(TypeError, match=r"\(name, kwargs\)"):
        experiments.sweep("digits-rotation", [("maoal", 5)], seeds=[0], **SMOKE)
    with pytest.raises(TypeError, match="Method 'maoal'"):
        experiments.sweep("digits-rotation", [("maoal", {"no_such_knob": 1})], seeds=[0], **SMOKE)


def test_the_cli_reads_methods_with_keyword_arguments_and_refuses_what_it_cannot_read():
    from auxnb.__main__ import UsageError, _method_specs

    assert _method_specs("stl, maoal(lower_steps=5,upper_lr=0.01),equal") == [
        "stl", ("maoal", {"lower_steps": 5, "upper_lr": 0.01}), "equal"]
    for bad in ("maoal(lower_steps=5", "maoal(5)", "maoal(x=os.getcwd())"):
        with pytest.raises(UsageError, match="--methods"):
            _method_specs(bad)


# --------------------------------------------------------------------------- the upper level's own randomness (issue 22)
class _NoisyCopy:
    """A view whose input and label are random: x + N(0, 1) noise from the generator it is given, the label
    whether the noise sums above 0."""

    def __call__(self, x, targets, generator=None):
        noise = torch.randn(x.shape, generator=generator)
        return x + noise, {**targets, "sign": (noise.sum(1) > 0).long()}


def _random_bundle():
    """A bundle with every source of randomness a lower step draws from: a training transform on torch's
    global random state, a view on the Trainer's generator, an auxiliary dataset with its own shuffle."""
    from auxnb.data import DataBundle

    g = torch.Generator().manual_seed(0)
    x, aux_x = torch.randn(80, 6, generator=g), torch.randn(40, 6, generator=g)
    tasks = TaskSet([Task("y", "classification", 2, primary=True), Task("sign", "classification", 2, stream="noisy"),
                     Task("other", "classification", 2, stream="other")])
    data = TaskDataset(x, {"y": (x[:, 0] > 0).long()})
    bundle = DataBundle(tasks, data.subset(range(48)), dev=data.subset(range(48, 56)), val=data.subset(range(56, 68)),
                        test=data.subset(range(68, 80)), aux_train={"other": TaskDataset(aux_x, {"other": (aux_x[:, 1] > 0).long()})},
                        views={"noisy": _NoisyCopy()}, transform=lambda b: b + 0.3 * torch.randn(b.shape),
                        eval_transform=lambda b: b)
    return tasks, bundle


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _fit_on_random_bundle(method, callbacks=(), **kw):
    tasks, bundle = _random_bundle()
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)
    uppers = []
    result = Trainer(model, method, bundle, steps=12, eval_every=4, batch_size=8, seed=0, progress=False, device="cpu",
                     callbacks=[lambda e, i: uppers.append(i) if e == "upper" else None, *callbacks], **kw).fit()
    return result, model, len(uppers)


@pytest.mark.parametrize("upper_data", ["train", "dev"])
def test_an_upper_step_that_moves_no_hyperparameter_leaves_the_lower_level_exactly_as_no_upper_step(upper_data):
    # MAOAL with upper_lr=0: every upper step computes a hypergradient (its look-back replays draw training
    # batches through the transform, the view and the auxiliary stream) and leaves α where it was. The lower
    # level must then train θ bit for bit as the same method that never takes an upper step: before the
    # upper level had streams of its own, its replays advanced the lower level's transform noise, view
    # generator and auxiliary shuffle, and the two runs parted after the first upper step
    kw = dict(upper_lr=0.0, terms=1, upper_data=upper_data)
    with_upper, model_a, n_a = _fit_on_random_bundle(methods.get("maoal", lower_steps=2, **kw))
    without, model_b, n_b = _fit_on_random_bundle(methods.get("maoal", lower_steps=1000, **kw))
    assert (n_a, n_b) == (6, 0)
    assert _same_weights(model_a, model_b)
    cols = ["val_accuracy", "val_loss", "train_loss/y", "train_loss/sign", "train_loss/other"]
    assert with_upper.history[cols].equals(without.history[cols])
    # and the upper steps did draw random training batches (the property is not vacuous): a learning
    # upper level moves θ away from the no-upper run
    learning, model_c, _ = _fit_on_random_bundle(methods.get("maoal", lower_steps=2, terms=1, upper_data=upper_data, upper_lr=0.5))
    assert not _same_weights(model_c, model_b)


def _stop_after_two_evaluations(make, checkpoint_dir) -> list[int]:
    """Train `make()` on the random bundle with checkpoints in `checkpoint_dir`, interrupted after its second
    evaluation (the checkpoint is written before the callbacks see it); the evaluated steps."""
    evals = []

    def stop(event, info):
        if event == "eval":
            evals.append(info["step"])
            if len(evals) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit_on_random_bundle(make(), callbacks=[stop], checkpoint_dir=checkpoint_dir)
    return evals


def test_the_upper_levels_random_state_is_its_own_reproducible_and_resumed_exactly(tmp_path):
    # two runs with the same seed: the same φ and θ (the upper level's random state starts from the seed);
    # a run stopped after its second evaluation and resumed from the checkpoint ends the same as both
    def make():
        return methods.get("maoal", lower_steps=2, terms=1, upper_data="train", upper_lr=0.5)

    first, model_1, _ = _fit_on_random_bundle(make())
    second, model_2, _ = _fit_on_random_bundle(make())
    assert _same_weights(model_1, model_2)
    evals = _stop_after_two_evaluations(make, tmp_path)
    assert evals == [4, 8] and (tmp_path / "checkpoint.pt").exists()  # the checkpoint is at step 8: it is written before the callbacks
    resumed, model_3, _ = _fit_on_random_bundle(make(), checkpoint_dir=tmp_path, resume=True)
    assert _same_weights(model_1, model_3)
    assert resumed.trace == first.trace and resumed.val_metric == first.val_metric


class _DrawingSetup(methods.get("stl").__class__):
    """STL whose set-up builds a module and draws from torch's global generator, as a user's method may."""

    def setup(self, model, info):
        super().setup(model, info)
        self.extra = torch.nn.Linear(6, 3)  # nn.Linear's default initialisation draws from the global generator
        self.drawn = torch.randn(4)


def _primary_path(model, tasks):
    """The weights the primary loss trains: the backbone and the primary head."""
    return {k: v for k, v in model.state_dict().items() if not any(f"heads.{t.name}." in k for t in tasks.auxiliary)}


def test_a_methods_setup_leaves_the_lower_levels_random_stream_alone():
    # the training transform draws its noise from torch's global generator; a method's set-up that draws from
    # it too (building a module) used to shift every batch's noise, so DTG trained on other noise than STL
    # of the same seed from its first step. Now the set-up runs on a random state of its own
    tasks, _ = _random_bundle()
    stl, model_a, _ = _fit_on_random_bundle(methods.get("stl"))
    drawing, model_b, _ = _fit_on_random_bundle(_DrawingSetup())
    assert _same_weights(model_a, model_b)
    assert stl.history["val_loss"].equals(drawing.history["val_loss"])
    # the set-up's own draws are the seed's: the same numbers on a second run
    again = _DrawingSetup()
    _fit_on_random_bundle(again)
    first = _DrawingSetup()
    _fit_on_random_bundle(first)
    assert torch.equal(again.drawn, first.drawn) and torch.equal(again.extra.weight, first.extra.weight)


def test_dtg_with_every_weight_at_zero_and_no_upper_step_trains_stl_exactly():
    # w_i = w_g = 0 and no upper step: DTG's lower objective L_p + Σ 0·L_ai + 0·L_g is the primary loss, so
    # the backbone and the primary head must be STL's bit for bit (same batches, same transform noise), the
    # generator's and the partner's draws notwithstanding. The view's and the auxiliary stream's forwards
    # leave BatchNorm alone (freeze_aux_buffers; this MLP has none anyway)
    tasks, _ = _random_bundle()
    _, model_a, _ = _fit_on_random_bundle(methods.get("stl"), freeze_aux_buffers=True)
    _, model_b, n = _fit_on_random_bundle(methods.get("dtg", init_weight=0.0, bilevel=False), freeze_aux_buffers=True)
    a, b = _primary_path(model_a, tasks), _primary_path(model_b, tasks)
    assert n == 0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the weights matter (the property is not vacuous): a small generated-sample weight moves θ
    _, model_c, _ = _fit_on_random_bundle(methods.get("dtg", init_weight=0.01, bilevel=False), freeze_aux_buffers=True)
    c = _primary_path(model_c, tasks)
    assert not all(torch.equal(a[k], c[k]) for k in a)


#: every bi-level method with its upper level switched to "compute and throw away" (φ's learning rate 0; JTDS and
#: N-JTDS without their warm-up, so that their upper steps run), against the same method with no upper step
_FROZEN_UPPER = {
    "maoal": dict(terms=1), "dtg": dict(terms=1, partner=True), "auxl": dict(terms=1), "jtds": dict(terms=1, warmup=0),
    "n-jtds": dict(num_ids=80), "auto-mix": {}, "auto-f-mix": {}, "maxl": {}, "auto-lambda": {}, "auxinash": {},
}


@pytest.mark.parametrize("name", sorted(_FROZEN_UPPER))
def test_every_bilevel_methods_upper_step_leaves_the_lower_levels_randomness_alone(name):
    # generalises the MAOAL test above to every bi-level method: an upper step that moves no φ must leave θ bit
    # for bit where no upper step would, whatever random numbers the method's own upper step draws (DTG's
    # pairings of generated samples drew from the lower level's generator until 2026-12-07)
    kw = dict(_FROZEN_UPPER[name], upper_lr=0.0)
    with_upper, model_a, n_a = _fit_on_random_bundle(methods.get(name, lower_steps=2, **kw))
    without, model_b, n_b = _fit_on_random_bundle(methods.get(name, lower_steps=1000, **kw))
    assert n_a == 6 and n_b == 0
    assert _same_weights(model_a, model_b)


def test_dev_in_train_gives_a_bilevel_method_stls_training_set_and_batches():
    # DTG with every weight at 0 and φ's learning rate 0 takes its upper steps on D_dev and its lower objective is
    # the primary loss: with dev_in_train its θ trains on D_train ∪ D_dev, STL's training set, so the backbone and
    # the primary head must be STL's bit for bit (same training set, same batches, same transform noise)
    tasks, bundle = _random_bundle()
    kw = dict(init_weight=0.0, lower_steps=2, terms=1, upper_lr=0.0, partner=True, upper_data="dev")
    _, model_a, _ = _fit_on_random_bundle(methods.get("stl"), freeze_aux_buffers=True)
    shared, model_b, n = _fit_on_random_bundle(methods.get("dtg", dev_in_train=True, **kw), freeze_aux_buffers=True)
    a, b = _primary_path(model_a, tasks), _primary_path(model_b, tasks)
    assert n == 6 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert shared.config["data"]["train"] == 56 and shared.config["data"]["dev"] == 8  # 48 + the 8 of D_dev; D_dev kept
    # the papers' rule (D_dev held out of θ's training) trains on 48 images, so θ differs: the property is not vacuous
    held_out, model_c, _ = _fit_on_random_bundle(methods.get("dtg", **kw), freeze_aux_buffers=True)
    c = _primary_path(model_c, tasks)
    assert held_out.config["data"]["train"] == 48 and not all(torch.equal(a[k], c[k]) for k in a)


def test_dev_in_train_bundle_is_the_single_level_bundle_with_d_dev_kept():
    _, bundle = _random_bundle()
    shared, merged = bundle.for_method(True, dev_in_train=True), bundle.for_method(False)
    assert torch.equal(shared.train.inputs, merged.train.inputs) and torch.equal(shared.train.index, merged.train.index)
    assert shared.dev is bundle.dev and merged.dev is None and bundle.for_method(True) is bundle
    assert shared.info["sizes"]["train"] == 56 and shared.info["sizes"]["dev"] == 8


def test_dev_in_train_resumes_exactly(tmp_path):
    def make():
        return methods.get("maoal", lower_steps=2, terms=1, upper_lr=0.5, upper_data="dev", dev_in_train=True)

    first, model_1, _ = _fit_on_random_bundle(make())
    _stop_after_two_evaluations(make, tmp_path)
    resumed, model_2, _ = _fit_on_random_bundle(make(), checkpoint_dir=tmp_path, resume=True)
    assert _same_weights(model_1, model_2) and resumed.trace == first.trace


def test_a_warm_started_series_is_kept_in_the_checkpoint_so_a_resumed_run_is_the_uninterrupted_one(tmp_path):
    # warm_start carries u from one upper step to the next: a resume that lost it would start the series afresh
    def make():
        return methods.get("jtds", lower_steps=2, terms=1, warmup=0, upper_lr=0.5, warm_start=0.9)

    first, model_1, _ = _fit_on_random_bundle(make())
    cold, model_cold, _ = _fit_on_random_bundle(methods.get("jtds", lower_steps=2, terms=1, warmup=0, upper_lr=0.5, warm_start=0.0))
    assert not _same_weights(model_1, model_cold)  # the warm start changes the run
    _stop_after_two_evaluations(make, tmp_path)
    resumed, model_2, _ = _fit_on_random_bundle(make(), checkpoint_dir=tmp_path, resume=True)
    assert _same_weights(model_1, model_2)
    assert resumed.history.drop(columns="seconds").equals(first.history.drop(columns="seconds"))


def test_a_series_built_in_the_warm_up_is_kept_in_the_checkpoint(tmp_path):
    # warmup_series: the warm-up's upper slots build u without moving φ; the run stops at step 8, the warm-up's
    # last slot, and a resume must find u there for φ's first update (step 10)
    def make(series=True):
        return methods.get("jtds", lower_steps=2, terms=1, warmup=8, upper_lr=0.5, warm_start=0.9, warmup_series=series)

    first, model_1, _ = _fit_on_random_bundle(make())
    plain, model_plain, _ = _fit_on_random_bundle(make(series=False))
    assert not _same_weights(model_1, model_plain)  # the series built in the warm-up changes φ's first updates
    assert _stop_after_two_evaluations(make, tmp_path) == [4, 8]
    resumed, model_2, _ = _fit_on_random_bundle(make(), checkpoint_dir=tmp_path, resume=True)
    assert _same_weights(model_1, model_2)
    assert resumed.history.drop(columns="seconds").equals(first.history.drop(columns="seconds"))


@pytest.mark.parametrize("bad, message", [
    (dict(dev_in_train=True, upper_data="train"), "dev_in_train needs upper_data='dev'"),
    (dict(dev_in_train=True, refit=0.5), "cannot be combined"),
    (dict(dev_in_train=1), "must be True"),
])
def test_dev_in_train_bad_values_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        methods.get("jtds", **bad)
