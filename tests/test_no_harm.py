"""Issue 13's safety switches against independent truth: MAOAL's log-space importance (chain rule
and finite differences of the lower direction), its gradient-ratio initial importance (norms by
hand), JTDS's down-weight-only filter (a property that must hold) and its log task weights."""

from __future__ import annotations

import time

import pytest
import torch

from auxnb.methods import JTDS, MAOAL, l2_penalty
from auxnb.methods.base import compute_terms
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import PRIMARY_STREAM, Task, TaskSet
from auxnb.train import UpperContext

from helpers import Recorder, setup_info

DT = torch.float64
TASKS = TaskSet([Task("y", "classification", 3, primary=True), Task("a", "classification", 2),
                 Task("b", "regression", stream="other")])


def _problem(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    train = {PRIMARY_STREAM: (torch.randn(12, 5, generator=g, dtype=DT),
                              {"y": torch.randint(0, 3, (12,), generator=g), "a": torch.randint(0, 2, (12,), generator=g),
                               "index": torch.arange(12)}),
             "other": (torch.randn(7, 5, generator=g, dtype=DT), {"b": torch.randn(7, generator=g, dtype=DT), "index": torch.arange(7)})}
    dev = {PRIMARY_STREAM: (torch.randn(9, 5, generator=g, dtype=DT), {"y": torch.randint(0, 3, (9,), generator=g)})}
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(MLP(5, hidden=(6,)), TASKS).to(DT)
    return model, train, dev


def _hypergrad(method, model, train, dev, lr=0.05):
    method.setup(model, setup_info(TASKS))
    params = tuple(p for p in model.parameters() if p.requires_grad)
    ctx = UpperContext(params=params, tasks=TASKS, train_batch=lambda: train, dev_batch=lambda: dev, lr=lr, step=0,
                       terms=lambda b, **kw: compute_terms(model, b, TASKS, **kw))
    method.upper_step(model, ctx)
    return method.upper_opt.grads[-1][0]


@pytest.mark.parametrize("lookback", [1, 3])
def test_log_importance_hypergradient_is_alpha_times_the_linear_one(lookback):
    # α = exp(β): ∂L/∂β = α ⊙ ∂L/∂α (chain rule), for the same α and the same data
    init = [[0.3, 1.7, 0.9, 0.4], [2.0, 0.05, 1.1, 0.7]]
    model, train, dev = _problem()
    common = dict(init=init, lookback=lookback, hyper_lr=0.05, clip=None, upper_optimizer=Recorder, upper_data="dev")
    lin = _hypergrad(MAOAL("block", **common), model, train, dev)
    log = _hypergrad(MAOAL("block", importance_param="log", **common), model, train, dev)
    alpha = torch.tensor(init, dtype=DT)
    assert lin.abs().max() > 1e-5
    torch.testing.assert_close(log, alpha * lin, rtol=1e-9, atol=1e-13)


def test_log_importance_first_order_hypergradient_equals_finite_differences_in_beta():
    # M = 1: ∇_β = −η · vᵀ ∂g(θ, exp β)/∂β with v = ∇_θ L_dev; the right side by central differences of g
    init = [[0.3, 1.7, 0.9, 0.4], [2.0, 0.05, 1.1, 0.7]]
    eta = 0.05
    model, train, dev = _problem()
    method = MAOAL("block", importance_param="log", init=init, lookback=1, hyper_lr=eta, clip=None,
                   upper_optimizer=Recorder, upper_data="dev")
    hyper = _hypergrad(method, model, train, dev, lr=eta)
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.autograd.grad(compute_terms(model, dev, TASKS, names=["y"]).mean("y"), params, allow_unused=True)
    v = [torch.zeros_like(p) if g is None else g for p, g in zip(params, v)]
    beta0 = method.alpha.detach().clone()
    fd = torch.zeros_like(beta0)
    eps = 1e-6
    for idx in range(beta0.numel()):
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                method.alpha.copy_(beta0)
                method.alpha.view(-1)[idx] += sign * eps
            g = method.direction(compute_terms(model, train, TASKS), params)
            vals.append(sum((gi * vi).sum() for gi, vi in zip(g, v)))
        fd.view(-1)[idx] = -eta * (vals[0] - vals[1]) / (2 * eps)
    torch.testing.assert_close(hyper, fd, rtol=1e-6, atol=1e-10)


def test_log_importance_falls_by_orders_of_magnitude_and_stays_positive():
    model, train, dev = _problem()
    method = MAOAL("model", importance_param="log", upper_optimizer="sgd", upper_lr=1.0, upper_momentum=0.0)
    method.setup(model, setup_info(TASKS))
    with torch.no_grad():  # twenty additive steps of −0.5 on β: α = exp(−10) ≈ 4.5e-5, never below 0
        for _ in range(20):
            method.alpha.sub_(0.5)
            method.project()
    alpha = method.importance()
    assert (alpha > 0).all() and torch.allclose(alpha, torch.full_like(alpha, torch.exp(torch.tensor(-10.0)).item()))
    with pytest.raises(ValueError, match="importance_param"):
        MAOAL(importance_param="exp")
    with pytest.raises(ValueError, match="> 0"):
        MAOAL(importance_param="log", init=0.0)
    with pytest.raises(ValueError, match="grad-ratio"):
        MAOAL(init="auto")


def test_grad_ratio_init_gives_every_auxiliary_loss_the_primary_gradient_norm():
    model, train, dev = _problem()
    l2 = l2_penalty(scale=3.0)
    method = MAOAL("block", init="grad-ratio", aux_losses={"l2": l2})
    method.setup(model, setup_info(TASKS))
    params = [p for p in model.parameters() if p.requires_grad]
    terms = compute_terms(model, train, TASKS)
    norms = {}
    for name, loss in [("y", terms.mean("y")), ("a", terms.mean("a")), ("b", terms.mean("b")), ("l2", l2(model, terms))]:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[name] = torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))
    method.direction(compute_terms(model, train, TASKS), params)
    alpha = method.importance().detach()
    for i, name in enumerate(method.loss_names):
        torch.testing.assert_close(alpha[i], torch.full_like(alpha[i], float(norms["y"] / norms[name])), rtol=1e-9, atol=0)
    # only the first batch sets it; state survives a state_dict round trip
    state = method.state_dict()
    assert state["pending_init"] is False
    before = alpha.clone()
    with torch.no_grad():
        for p in params:
            p.mul_(2.0)  # other gradients now: α must not be re-initialised
    method.direction(compute_terms(model, train, TASKS), params)
    torch.testing.assert_close(method.importance().detach(), before)


def _jtds_weights(method, seed=0):
    tasks = TaskSet([Task("y", "classification", 3, primary=True), Task("a", "classification", 2)])
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MultiHeadModel.for_tasks(MLP(5, hidden=(6,)), tasks).to(DT)
    method.setup(model, setup_info(tasks, seed))
    with torch.no_grad():
        for p in method.hparams():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    batch = {PRIMARY_STREAM: (torch.randn(16, 5, generator=g, dtype=DT),
                              {"y": torch.randint(0, 3, (16,), generator=g), "a": torch.randint(0, 2, (16,), generator=g),
                               "index": torch.arange(16)})}
    terms = compute_terms(model, batch, tasks)
    return method, terms, method.schedule(terms)


@pytest.mark.parametrize("seed", range(4))
def test_jtds_downweight_only_never_weighs_a_sample_above_its_task_and_never_favours_high_loss(seed):
    # the filter alone (no feature term): weights must be non-increasing in the sample's loss, at most
    # the task weight — σ1(α_k)/σ1(1) with the primary's α left at its initial 1 (pin_primary, the default),
    # and 1 for the primary — and the lowest-loss sample gets exactly that weight
    method, terms, w = _jtds_weights(JTDS("no-feature", downweight_only=True), seed)
    assert method.pin_primary and (method.slope() <= 0).all()
    sp = torch.nn.functional.softplus
    task_w = sp(method.alpha.detach()) / sp(torch.tensor(1.0, dtype=method.alpha.dtype))
    task_w[method._primary_col] = 1.0
    for k, name in enumerate(method._names):
        loss, weight = terms.losses[name].detach(), w[name].detach()
        assert (weight <= task_w[k] * (1 + 1e-12)).all()
        order = torch.argsort(loss)
        assert (weight[order].diff() <= 1e-12).all()
        torch.testing.assert_close(weight[order[0]], task_w[k].detach())
    # the same hyper-parameters without the switch can favour high losses (a > 0 somewhere)
    plain, terms2, w2 = _jtds_weights(JTDS("no-feature"), seed)
    assert plain.filter_a.shape == method.filter_a.shape


def test_jtds_downweight_only_slope_is_differentiable_and_bad_combinations_are_errors():
    method, terms, w = _jtds_weights(JTDS(downweight_only=True), 1)
    total = sum(v.sum() for v in w.values())
    grads = torch.autograd.grad(total, method.hparams(), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert (method.scheduler_trace()["filter_a"] <= 0).all()
    with pytest.raises(ValueError, match="downweight_only"):
        JTDS(downweight_only=True, normalize="softmax")
    with pytest.raises(TypeError, match="downweight_only"):
        JTDS(downweight_only="yes")


def test_no_harm_table_against_hand_computed_paired_differences():
    import pandas as pd

    from auxnb.report import no_harm_table

    rows = []
    acc = {  # case -> label -> per-seed accuracy
        "helpful": {"STL": [0.60, 0.70, 0.65], "Equal": [0.64, 0.72, 0.66], "M": [0.66, 0.73, 0.68]},
        "harmful": {"STL": [0.90, 0.92, 0.91], "Equal": [0.70, 0.75, 0.72], "M": [0.90, 0.80, 0.905]},
    }
    for case, labels in acc.items():
        for label, values in labels.items():
            rows += [{"case": case, "label": label, "seed": s, "test": v} for s, v in enumerate(values)]
    out = no_harm_table(pd.DataFrame(rows), reference={"harmful": "STL"}).set_index("case")
    # helpful: Equal is better (mean 67.33 vs 65); M − Equal = (2, 1, 2) -> mean 5/3, wins, above both
    assert out.loc["helpful", "reference"] == "Equal"
    assert out.loc["helpful", "mean"] == pytest.approx(5 / 3)
    assert out.loc["helpful", "verdict"] == "wins" and out.loc["helpful", "above_all"]
    assert out.loc["helpful", "worst"] == pytest.approx(3.0) and not out.loc["helpful", "collapsed"]  # M − STL = (6, 3, 3)
    # harmful: against STL by request; M − STL = (0, −12, −0.5) -> mean −12.5/3, loses, seed 1 collapsed
    assert out.loc["harmful", "reference"] == "STL"
    assert out.loc["harmful", "mean"] == pytest.approx(-12.5 / 3)
    assert out.loc["harmful", "verdict"] == "loses" and not out.loc["harmful", "above_all"]
    assert out.loc["harmful", "worst"] == pytest.approx(-12.0) and out.loc["harmful", "collapsed"]


# The guard's rule and its run-level switch are tested in tests/test_selection.py (issue 23).
def test_methods_train_alone_and_the_published_presets_carry_no_guard_keyword():
    from auxnb.experiments.protocols import paper_methods
    from auxnb.methods import DTG

    for method in (MAOAL(), JTDS(), DTG(), MAOAL.paper(), JTDS.paper(), DTG.paper()):
        assert getattr(method, "_legacy_guard", None) is None and not hasattr(method, "fallback")
    assert all("fallback" not in paper_methods("cifar")[n] for n in ("maoal", "jtds", "dtg"))


def test_the_equal_fallback_weights_the_methods_own_tasks_and_extra_losses_by_one():
    """By hand: tasks y (primary), a, b; MAOAL uses a only plus an extra loss 0.5·‖w‖²: the Equal
    fallback's objective must be L_y + L_a + 0.5·‖w‖² (b left out, every weight 1)."""
    from auxnb.methods.base import LossTerms, SetupInfo
    from auxnb.methods.guard import equal_fallback
    from auxnb.tasks import Task, TaskSet

    tasks = TaskSet([Task("y", "regression", primary=True), Task("a", "regression"), Task("b", "regression")])
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    model = torch.nn.Linear(2, 1)
    extra = {"sq": lambda model_, terms: 0.5 * (w ** 2).sum()}
    equal = equal_fallback(MAOAL(aux_tasks=["a"], aux_losses=extra))
    assert equal.task_names(tasks) == ["y", "a"]
    equal.setup(model, SetupInfo(tasks, torch.device("cpu"), num_train=4, seed=0))
    losses = {"y": w[0] * torch.tensor([1.0, 3.0]), "a": w[1] * torch.tensor([2.0, 2.0])}  # means 2·w0, 2·w1
    terms = LossTerms(tasks=tasks, losses=losses, masks={k: torch.ones(2, dtype=torch.bool) for k in losses},
                      outputs={}, features={}, targets={})
    (grad,) = equal.direction(terms, [w])
    # d/dw (2·w0 + 2·w1 + 0.5·‖w‖²) = (2 + w0, 2 + w1) = (3, 0) at w = (1, −2)
    torch.testing.assert_close(grad, torch.tensor([3.0, 0.0]))
    assert equal_fallback(JTDS()).task_names(tasks) == tasks.names  # a method without aux_tasks: all tasks


@pytest.mark.slow  # five short digits runs (~25 s of CPU)
def test_the_run_level_guard_equals_the_selection_over_the_separate_runs():
    from auxnb.experiments import run
    from auxnb.methods import STL

    kw = dict(seed=0, scale="smoke", device="cpu", progress=False, label_fraction=0.1, dev_size=20, steps=12, eval_every=4)
    t0 = time.perf_counter()
    guarded = run("digits-rotation", "jtds", guard="stl", guard_margin=0.005, **kw)
    wall = time.perf_counter() - t0
    alone = run("digits-rotation", "jtds", guard=None, **kw)
    stl = run("digits-rotation", "stl", **kw)
    info = guarded.config["selection"]
    assert info["val"] == {"stl": stl.val_metric, "jtds": alone.val_metric}
    best = alone if alone.val_metric > stl.val_metric + 0.005 else stl
    assert guarded.test_metric == pytest.approx(best.test_metric)
    # what the result cost is both trainings, not only the kept one's (a user budgets from it)
    assert guarded.timings["fits"] == 2
    assert wall >= guarded.timings["total_s"] > guarded.timings["run_total_s"] > 0
    assert "fits" not in alone.timings
    # the model holds the kept run's best weights afterwards
    kept_state = {k: v.detach().cpu() for k, v in guarded.model.state_dict().items()}
    torch.testing.assert_close(kept_state, best.weights)
    # the harmful-L2 case: MAOAL with an extra loss only; its Equal candidate must be STL + 1·L2 exactly
    l2 = {"l2": l2_penalty(scale=1.0)}
    guarded = run("digits-rotation", MAOAL(aux_tasks=[], aux_losses=l2), guard="stl+equal", **kw)
    plus_l2 = run("digits-rotation", STL(aux_losses=l2), **kw)
    assert guarded.config["selection"]["val"]["equal"] == pytest.approx(plus_l2.val_metric)


def test_plots_of_a_guarded_run_that_kept_stl_show_what_the_method_learned_and_say_so():
    """A guarded MAOAL run whose STL fallback was kept: its own trace learned nothing, the
    method's trace (trace_trials) did; the plots must show the method's α and name the fallback."""
    import matplotlib

    matplotlib.use("Agg")
    from auxnb.plot import learned_frame, task_weights

    class Kept:
        config = {"method": "stl", "fallback": {"fallback": "stl+equal", "method": "maoal", "kept": "stl"}}
        trace = [{"step": 4}]
        trace_trials = [{"step": 2, "importance/l2/conv1": 0.5}, {"step": 4, "importance/l2/conv1": 0.25}]

    assert learned_frame(Kept())[["step", "value"]].values.tolist() == [[2, 0.5], [4, 0.25]]
    assert "maoal (not kept: the guard kept stl)" in task_weights(Kept()).get_title()

    class Own(Kept):  # the method's run was kept: its own trace
        config = {"method": "maoal", "fallback": {"fallback": "stl+equal", "method": "maoal", "kept": "maoal"}}
        trace = [{"step": 4, "importance/l2/conv1": 0.75}]

    assert learned_frame(Own())["value"].tolist() == [0.75]


def test_a_sweep_row_says_which_run_the_guard_kept():
    from auxnb.experiments import run, sweep

    kw = dict(scale="smoke", device="cpu", progress=False, steps=6, eval_every=3)
    table = sweep("digits-rotation", ["stl", "jtds"], seeds=[0], guard="auto", **kw).set_index("method")
    alone = run("digits-rotation", "jtds", seed=0, **kw)  # the same guarded run, outside a sweep
    assert table.loc["jtds", "kept"] == alone.config["selection"]["kept"] in ("jtds", "stl", "equal")
    assert table.loc["stl", "kept"] == ""  # STL has no guard


def test_the_rounding_control_is_judged_like_a_method_against_the_better_baseline():
    # hand-computed: over seeds 0-2 Equal is the better baseline (mean 70.33 vs 70.00); the control minus
    # Equal is −3, +3, −3 points (mean −1.0: "loses"), its worst seed against STL −2.0 (seed 2); seeds 3-4
    # form the second block, where the control is +1.0 on STL (the better there) on both seeds
    import sys
    from pathlib import Path

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from no_harm import CONTROL_LABEL, control_verdicts

    values = {"STL": [0.70, 0.60, 0.80, 0.70, 0.80], "Equal": [0.72, 0.58, 0.81, 0.60, 0.70],
              CONTROL_LABEL: [0.69, 0.61, 0.78, 0.71, 0.81]}
    runs = pd.DataFrame([{"case": "c", "label": label, "role": "baseline" if label != CONTROL_LABEL else "candidate",
                          "seed": seed, "test": v} for label, vs in values.items() for seed, v in enumerate(vs)])
    out = control_verdicts(runs, {"a": range(0, 3), "b": range(3, 5)}).loc["c"]
    assert out["Δ better baseline a"] == pytest.approx(-1.0) and out["verdict a"] == "loses"
    assert out["worst vs STL a"] == pytest.approx(-2.0)
    assert out["Δ better baseline b"] == pytest.approx(1.0) and out["verdict b"] == "wins"


def test_the_seeds_a_verdict_needs_follow_from_the_paired_spread_computed_by_hand():
    # hand-computed: the control minus STL is −1, +1, −1, +1 points: mean 0, SD √(4/3) = 1.1547 (n − 1 = 3);
    # a ±0.5 95 % interval needs n ≥ (1.96 · 1.1547 / 0.5)² = 20.49, so 21 seeds; ±1.0 needs ⌈5.12⌉ = 6.
    # Equal minus STL is +2 on every seed: SD 0, one seed would do (n = 0 → reported as 0)
    import sys
    from pathlib import Path

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from no_harm import CONTROL_LABEL, seeds_needed

    values = {"STL": [0.70, 0.60, 0.80, 0.70], CONTROL_LABEL: [0.69, 0.61, 0.79, 0.71], "Equal": [0.72, 0.62, 0.82, 0.72]}
    runs = pd.DataFrame([{"case": "c", "label": label, "seed": seed, "test": v}
                         for label, vs in values.items() for seed, v in enumerate(vs)])
    out = seeds_needed(runs).set_index("entry")
    assert out.loc[CONTROL_LABEL, "SD of Δ STL"] == pytest.approx(1.15, abs=0.005)
    assert out.loc[CONTROL_LABEL, "mean Δ STL"] == pytest.approx(0.0, abs=1e-9) and out.loc[CONTROL_LABEL, "worst Δ STL"] == -1.0
    assert out.loc["Equal", "mean Δ STL"] == 2.0 and out.loc["Equal", "worst Δ STL"] == 2.0
    assert out.loc[CONTROL_LABEL, "seeds for ±0.5 (95 %)"] == 21
    assert out.loc["Equal", "seeds for ±0.5 (95 %)"] == 0 and out.loc["Equal", "seeds"] == 4
    assert seeds_needed(runs, [CONTROL_LABEL], half_width=1.0).iloc[0]["seeds for ±1 (95 %)"] == 6
    # against Equal: the control's differences are -3, -1, -3, -1 points (SD √(4/3) = 1.15); STL's
    # are -2 on every seed: SD 0, no seed needed beyond the pairing
    to_equal = seeds_needed(runs, reference="Equal").set_index("entry")
    assert to_equal.loc[CONTROL_LABEL, "SD of Δ Equal"] == pytest.approx(1.15, abs=0.005)
    assert to_equal.loc["STL", "SD of Δ Equal"] == 0 and "Equal" not in to_equal.index


@pytest.mark.parametrize("overrides", [{"label_noise": 0.4}, {"label_fraction": 0.1}, {"shots": 5, "dev_size": 10}])
def test_the_whole_test_pool_leaves_training_val_and_dev_as_they_were_and_contains_the_sample(overrides):
    # `no_harm.py --full-test` rests on this: on a setting whose D_test comes from a pool of its own (Fashion-MNIST's
    # official test images, ``val_from="train"``), asking for all of it instead of the scale's 1,000 changes no
    # training, validation or D_dev image and no label (noisy ones included), and the 1,000 are among the 10,000
    from auxnb import experiments as E
    from auxnb.experiments.protocols import pools_bundle
    from auxnb.data import TaskDataset

    def pool(n: int, offset: int) -> TaskDataset:
        return TaskDataset(torch.arange(offset, offset + n, dtype=torch.float32)[:, None], {"item": torch.arange(n) % 10})

    tasks = TaskSet([Task("item", "classification", 10, primary=True)])
    config = {**E.get_setting("fashion-rotation").config("small"), "seed": 3, **overrides}
    sampled = pools_bundle(pool(6_000, 0), pool(10_000, 100_000), tasks, config, val_from="train")
    whole = pools_bundle(pool(6_000, 0), pool(10_000, 100_000), tasks, {**config, "test_size": None}, val_from="train")
    for split in ("train", "dev", "val"):
        a, b = getattr(sampled, split), getattr(whole, split)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets["item"], b.targets["item"]), split
    assert len(sampled.test) == 1_000 and len(whole.test) == 10_000
    assert set(sampled.test.inputs[:, 0].tolist()) <= set(whole.test.inputs[:, 0].tolist())


def test_full_test_keeps_its_runs_apart_and_refuses_a_case_whose_test_images_come_from_training():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from no_harm import FULL_TEST_CASES, entries, full_test

    by_case = {e.case: e for e in entries()}
    assert "f-noise-40%" in FULL_TEST_CASES and "l2-digits" not in FULL_TEST_CASES
    whole = full_test(by_case["f-noise-40%"])
    assert whole.overrides == {"test_size": None} and whole.key != by_case["f-noise-40%"].key
    with pytest.raises(ValueError, match="l2-digits.*training pool"):
        full_test(by_case["l2-digits"])


def test_the_test_samples_share_of_a_paired_spread_against_hand_computed_numbers():
    # hand-computed: STL on the sample 61, 69, 82, 65 against 60, 70, 80, 65 on the whole pool (errors +1, −1, +2, 0);
    # the method, recorded as "M old" on the sample, 64, 72, 79 against 62, 73, 79 (+2, −1, 0); its seed 3 is another
    # model (D_val differs) and is left out. Method − STL: 3, 3, −3 on the sample (SD √12 = 3.46), 2, 3, −1 on the
    # whole pool (SD √(13/3) = 2.08), the change 1, 0, −2 (SD √(7/3) = 1.53). The seven errors' SD is √(68/42) = 1.27;
    # binomial at p = 489/7 % for 1,000 of 10,000: 100·√(p(1 − p)/1000 · 9000/9999) = 1.38
    import sys
    from pathlib import Path

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from no_harm import same_models, spread_by_test_set

    def rows(label, tests, vals):
        return [{"case": "c", "label": label, "seed": s, "val": v, "best_step": 90, "test": t}
                for s, (t, v) in enumerate(zip(tests, vals))]

    sampled = pd.DataFrame(rows("STL", [.61, .69, .82, .65], [.5, .6, .7, .55]) + rows("M old", [.64, .72, .79, .70], [.51, .61, .71, .56]))
    whole = pd.DataFrame(rows("STL", [.60, .70, .80, .65], [.5, .6, .7, .55]) + rows("M", [.62, .73, .79, .75], [.51, .61, .71, .57]))
    pairs = same_models(sampled, whole, aliases={"M": "M old"})
    assert len(pairs) == 7 and not ((pairs["label"] == "M") & (pairs["seed"] == 3)).any()
    assert sorted(pairs["error"].round(6)) == [-1, -1, 0, 0, 1, 2, 2]
    out = spread_by_test_set(pairs, {"c": "M"}).iloc[0]
    assert out["SD of Δ STL, sample"] == pytest.approx(12 ** 0.5, abs=0.005)
    assert out["SD of Δ STL, whole"] == pytest.approx((13 / 3) ** 0.5, abs=0.005)
    assert out["SD of the change"] == pytest.approx((7 / 3) ** 0.5, abs=0.005)
    assert out["SD of sample error"] == pytest.approx((68 / 42) ** 0.5, abs=0.005)
    assert out["binomial SD"] == pytest.approx(1.38, abs=0.005) and out["seeds"] == 3


def test_the_verdict_table_per_seed_block_against_hand_computed_means():
    # hand-computed, block "a" (seeds 0-1): STL 60, 70 (mean 65), Equal 62, 64 (63): STL is the better baseline;
    # the method alone 63, 69 → Δ +3, −1, mean +1.0 ("wins"), worst vs STL −1.0; guarded 60, 71 → +0.5.
    # Block "b" (seed 10): Equal 70 beats STL 66; alone 69 → −1.0 ("loses"), worst vs STL +3.0; guarded 70 → 0.0
    import sys
    from pathlib import Path

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from no_harm import verdicts

    values = {"STL": [60, 70, 66], "Equal": [62, 64, 70], "M, guard off": [63, 69, 69], "M recommended": [60, 71, 70]}
    both = pd.DataFrame([{"case": "c", "label": label, "seed": seed, "test": v / 100}
                         for label, vs in values.items() for seed, v in zip((0, 1, 10), vs)])
    out = verdicts(both, {"a": range(0, 2), "b": range(10, 11), "unused": range(20, 25)}).loc["c"]
    assert out["method"] == "M"
    assert out["alone a"] == pytest.approx(1.0) and out["verdict alone a"] == "wins"
    assert out["worst alone vs STL a"] == pytest.approx(-1.0) and out["guarded a"] == pytest.approx(0.5)
    assert out["alone b"] == pytest.approx(-1.0) and out["verdict alone b"] == "loses"
    assert out["worst alone vs STL b"] == pytest.approx(3.0) and out["guarded b"] == pytest.approx(0.0)
    assert not any(column.endswith("unused") for column in out.index)


def test_labels_select_by_prefix_or_whole_label(capsys):
    # `--labels` keeps entries by prefix; "STL$" is STL alone, not the rounding control whose label starts with "STL"
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from no_harm import CONTROL_LABEL, _label_matches, main

    assert CONTROL_LABEL.startswith("STL")
    assert _label_matches(CONTROL_LABEL, "STL") and _label_matches("STL", "STL")
    assert _label_matches("STL", "STL$") and not _label_matches(CONTROL_LABEL, "STL$")
    assert not _label_matches("STL", "Equal") and not _label_matches("MAOAL recommended", "MAOAL$")
    with pytest.raises(SystemExit) as exit_:  # nothing selected: a usage error before any run, not an empty table
        main(["--case", "f-5-shot", "--labels", "MAOAL", "--collect-only"])
    assert exit_.value.code == 2 and "matches --labels 'MAOAL'" in capsys.readouterr().err
