"""Auto-Lambda against independent truth: the finite-difference hypergradient vs the exact one by double backward,
a one-step case computed by hand, and the upper step leaving θ, its buffers and the process RNG untouched."""

import pytest
import torch
from helpers import Recorder  # records the hypergradient it is handed, leaves φ alone
from torch import nn

from auxnb import methods
from auxnb.methods.autolambda import AutoLambda, finite_difference_hypergrad
from auxnb.methods.base import LossTerms, SetupInfo
from auxnb.methods.upper import UpperLevel
from auxnb.tasks import PRIMARY_STREAM, Task, TaskSet
from auxnb.train import UpperContext

torch.set_default_dtype(torch.float32)


class Quadratic(nn.Module):
    """Task k's loss on a batch (a, b): mean over rows of ½(a_k·w − b_k)² (+ a task-specific head c_k)."""

    def __init__(self, names):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
        self.names = names


def _tasks(names):
    return TaskSet([Task(names[0], "regression", primary=True), *(Task(n, "regression") for n in names[1:])])


def _losses(w, batch, names):
    # batch: task -> (A [n, 3], b [n]): least squares per task
    return {n: 0.5 * (batch[n][0] @ w - batch[n][1]) ** 2 for n in names if n in batch}


def _context(model, tasks, train, dev, lr):
    names = tasks.names

    def terms(batch, names=None):
        losses = _losses(model.backbone.w, batch, names or tasks.names)
        return LossTerms(tasks=tasks, losses=losses, masks={n: torch.ones_like(v, dtype=torch.bool) for n, v in losses.items()},
                         outputs={}, features={}, targets={})

    return UpperContext(params=(model.backbone.w,), tasks=tasks, train_batch=lambda: train, dev_batch=lambda: dev,
                        lr=lr, step=0, terms=terms)


def _data(names, seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))
            for k in names}


def _exact_hypergrad(model, tasks, lam, train, dev, lr):
    """d/dλ L_pri(θ − lr ∇_θ Σ λ_k L_k(θ); dev) by autograd through the virtual step (double backward)."""
    lam = lam.detach().clone().requires_grad_(True)
    w = model.backbone.w
    losses = _losses(w, train, tasks.names)
    inner = sum(lam[i] * losses[n].mean() for i, n in enumerate(tasks.names))
    (g,) = torch.autograd.grad(inner, [w], create_graph=True)
    w_next = w - lr * g
    outer = _losses(w_next, dev, [tasks.primary.name])[tasks.primary.name].mean()
    (hyper,) = torch.autograd.grad(outer, [lam])
    return hyper



def _method(names, model, **kwargs):
    method = AutoLambda(upper_optimizer=Recorder, **kwargs)
    method.setup(model, SetupInfo(tasks=_tasks(names), device=torch.device("cpu"), num_train=6, seed=0))
    with torch.no_grad():
        method.task_weights.copy_(torch.tensor([1.0, 0.4, 0.7][: len(names)], dtype=method.task_weights.dtype))
    method.task_weights.data = method.task_weights.data.double()
    method._upper_opt = None
    return method


@pytest.mark.parametrize("lr", [0.05, 0.3])
def test_upper_step_hypergradient_matches_the_exact_one_by_double_backward(lr):
    names = ["main", "a1", "a2"]
    model = Quadratic(names)
    tasks = _tasks(names)
    train, dev = _data(names, 0), _data(names, 1)
    method = _method(names, model, hyper_lr="lower")
    exact = _exact_hypergrad(model, tasks, method.task_weights, train, dev, lr)
    w_before = model.backbone.w.detach().clone()
    info = method.upper_step(model, _context(model, tasks, train, dev, lr))
    (got,) = method.upper_opt.grads[-1]
    # a central difference of losses quadratic in θ is exact up to rounding: float64 agrees tightly
    assert torch.allclose(got, exact, rtol=1e-6, atol=1e-9), (got, exact)
    assert torch.equal(model.backbone.w.detach(), w_before)  # θ is restored bit for bit
    assert info["hypergrad_norm"] == pytest.approx(float(exact.norm()), rel=1e-6)


def test_finite_difference_on_a_non_quadratic_loss_approaches_the_exact_mixed_derivative():
    # L_k = Σ exp(a_k ⊙ w): the central difference's error is O(ε²) with ε = 0.01/‖v‖
    torch.manual_seed(0)
    w = torch.randn(4, dtype=torch.float64)
    a = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(4, dtype=torch.float64)
    fd = finite_difference_hypergrad(lambda: torch.exp(a * w).sum(1), [w], [v], 0.1)
    exact = -0.1 * (a * torch.exp(a * w)) @ v  # −lr · ∇_θ L_k · v, row by row
    assert torch.allclose(fd, exact, rtol=1e-4)


def test_one_step_case_computed_by_hand():
    # one scalar θ = 1, primary L_p = ½(θ − 2)², auxiliary L_a = ½(θ + 1)², λ = (1, 0.5), α = 0.1, dev = train.
    # g = λ_p(θ − 2) + λ_a(θ + 1) = −1 + 1 = 0, so θ' = θ = 1; v = ∇L_p(θ') = θ' − 2 = −1.
    # ∂²L/∂λ∂θ · v = (∂L_p/∂θ, ∂L_a/∂θ)·v = (−1, 2)·(−1) = (1, −2); hypergradient = −α·(1, −2) = (−0.1, 0.2):
    # raising the primary weight and lowering the auxiliary one both lower the primary look-ahead loss.
    tasks = _tasks(["main", "a1"])
    model = Quadratic(["main", "a1"])
    model.backbone.w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    batch = {"main": (torch.ones(1, 1, dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)),
             "a1": (torch.ones(1, 1, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64))}
    method = _method(["main", "a1"], model, hyper_lr=0.1)
    with torch.no_grad():
        method.task_weights.copy_(torch.tensor([1.0, 0.5], dtype=torch.float64))
    method.upper_step(model, _context(model, tasks, batch, batch, lr=999.0))  # hyper_lr=0.1 overrides the lower lr
    (got,) = method.upper_opt.grads[-1]
    assert torch.allclose(got, torch.tensor([-0.1, 0.2], dtype=torch.float64), atol=1e-9)


def test_lower_direction_is_the_lambda_weighted_gradient_primary_included():
    names = ["main", "a1"]
    model = Quadratic(names)
    tasks = _tasks(names)
    method = _method(names, model)
    batch = _data(names, 3)
    ctx = _context(model, tasks, batch, batch, 0.1)
    (d,) = method.direction(ctx.terms(batch), [model.backbone.w])
    w = model.backbone.w
    expected = sum(lam * torch.autograd.grad(_losses(w, batch, [n])[n].mean(), [w])[0]
                   for lam, n in zip((1.0, 0.4), names))
    assert torch.allclose(d, expected)


def test_presets_follow_the_authors_code_and_the_default_measures_on_dev():
    u = UpperLevel.authors("auto-lambda", "cifar")
    assert (u.lower_steps, u.upper_optimizer, u.upper_lr, u.hyper_lr, u.upper_data) == (1, "adam", 3e-4, "lower", "train")
    assert UpperLevel.authors("auto-lambda", "nyuv2").upper_lr == 1e-4
    assert UpperLevel.paper_text("auto-lambda", "cifar").upper_data == "dev"
    m = methods.get("auto-lambda")
    assert m.init == 0.1 and m.upper_data == "dev" and m.uses_dev
    with pytest.raises(ValueError, match="init must be a finite number"):
        methods.get("auto-lambda", init=float("nan"))


def test_the_module_docstring_examples_run():
    import doctest

    from auxnb.methods import autolambda

    result = doctest.testmod(autolambda)
    assert result.failed == 0 and result.attempted >= 2


def test_phi_batches_other_than_one_is_refused_with_the_reason():
    # Auto-λ's hypergradient is a finite difference on one batch: there is no uᵀ∂g/∂φ product to average
    with pytest.raises(ValueError, match="finite-difference hypergradient reads one training batch"):
        AutoLambda(phi_batches=2)
    assert AutoLambda(phi_batches=1).upper.phi_batches == 1
    with pytest.raises(ValueError, match="no Neumann series to warm-start"):
        AutoLambda(warm_start=0.5)
