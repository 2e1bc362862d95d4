"""benchmarks/step_cost.py --cost-model (issue 14): the counted passes match the configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_cost  # noqa: E402


def test_cost_model_counts_the_upper_steps_products_of_the_recommended_configurations():
    """MAOAL (T = 3, M = 3: two Neumann products, α's product outside the second-order graph) and
    JTDS (T = 5, K = 2 since issue 22's cost round, hyper_lr="auto": a power iteration at the first upper step) over 6 / 10
    lower steps: the counts are T's and K's, and every instrumented function is restored."""
    from auxnb import hypergrad, train
    from auxnb.methods import bilevel

    before = (hypergrad._vjp, train.compute_terms, bilevel.largest_eigenvalue, bilevel.BilevelMethod.upper_step)
    torch.manual_seed(0)
    maoal = step_cost.measure_passes("maoal", "digits-rotation", 6, 16, 0)
    assert (maoal["n_upper"], maoal["n_hvp"], maoal["n_phi_vjp"], maoal["n_power"]) == (2, 4, 2, 0)
    assert maoal["n_direction"] == 2 and maoal["n_forward"] == 4  # a train and an upper-train batch each
    torch.manual_seed(0)
    jtds = step_cost.measure_passes("jtds", "digits-rotation", 10, 16, 0)
    assert step_cost.method_for("jtds").terms == 2
    assert (jtds["n_upper"], jtds["n_hvp"], jtds["n_phi_vjp"], jtds["n_power"]) == (2, 4, 2, 1)
    assert 1 <= jtds["n_power_hvp"] <= 20  # largest_eigenvalue's default iters
    assert jtds["upper"] >= jtds["hvp"] + jtds["phi_vjp"] + jtds["power"] > 0
    after = (hypergrad._vjp, train.compute_terms, bilevel.largest_eigenvalue, bilevel.BilevelMethod.upper_step)
    assert before == after


def test_the_benchmark_times_the_method_alone_not_the_run_its_guard_keeps():
    """`run` guards MAOAL/JTDS/DTG by default, and a guarded result carries the *kept* run's timings
    (STL's or Equal's when a fallback wins): the benchmark measures the method's own run (a Trainer
    trains the method alone) and reports the guard's extra runs apart."""
    for entry in ("maoal", "jtds", "dtg"):
        assert step_cost.guarded(entry) == "stl+equal"  # run's default (guard="auto")
        method = step_cost.method_for(entry)
        assert method.name == entry and getattr(method, "_legacy_guard", None) is None
    assert step_cost.guarded("stl") is None and step_cost.method_for("equal").name == "equal"
    # the run measured is the method's: its upper steps are timed (a guard keeping STL would report none)
    lower, whole = step_cost.measure("maoal", "digits-rotation", 3, 16, 0)
    assert whole > lower > 0


def test_backward_counter_counts_one_pass_per_cotangent_batched_or_looped():
    """Three losses' gradients: three passes whether `per_loss_grads` batches them in one vmapped call
    or loops; a plain `.backward()` is one; a call that raises counts none; autograd is restored."""
    from auxnb.hypergrad import per_loss_grads

    before = (torch.autograd.grad, torch.autograd.backward)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    with step_cost.counting_backward_passes() as counts:
        per_loss_grads([(w**2).sum(), (3 * w).sum(), w.prod()], (w,), batched=True)
        assert counts["lower"] == 3
        per_loss_grads([(w**2).sum(), (3 * w).sum(), w.prod()], (w,), batched=False)
        assert counts["lower"] == 6
        (w**2).sum().backward()
        assert counts["lower"] == 7
        try:
            torch.autograd.grad(w.detach().sum(), w)  # no graph: autograd raises
        except RuntimeError:
            pass
        assert counts == {"lower": 7, "upper": 0, "upper_steps": 0}
    assert (torch.autograd.grad, torch.autograd.backward) == before


def test_backward_passes_per_step_are_the_methods_documented_counts():
    """digits-rotation has K = 1 auxiliary task: STL and Equal take one backward per lower step, GCS and
    the aggregator one per task (K + 1 = 2), ForkMerge one per branch (2 by default: all tasks, the
    primary alone) and none in its merges (forwards on D_dev; a merge after every quarter of the run,
    here every step), Auto-Lambda one per lower step plus two per upper step (g at θ, the dev gradient
    at θ'; its θ ± εv losses are forwards), an upper step after every lower step."""
    steps = 4
    expected = {"stl": (1, 0, 0), "equal": (1, 0, 0), "gcs": (2, 0, 0), "aggregator-upgrad": (2, 0, 0),
                "forkmerge": (2, 0, steps), "auto-lambda": (1, 2, steps)}
    for entry, (lower, per_upper, ups) in expected.items():
        counts: dict[str, int] = {}
        step_cost.measure(entry, "digits-rotation", steps, 16, 0, counts)
        assert counts["lower"] == lower * steps, entry
        assert counts["upper_steps"] == ups and counts["upper"] == per_upper * ups, entry
