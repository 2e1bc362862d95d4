"""AuxiNash against independent truth: the bargaining solution's defining equation and its closed form for
orthogonal gradients, dα/dp of the upper-step graph vs finite differences of the solver, the clipped lower
direction by hand, and the powers' projection."""

import math

import pytest
import torch
from helpers import Recorder  # records the hypergradient it is handed, leaves φ alone
from torch import nn

from auxnb import methods
from auxnb.methods.auxinash import AuxiNash, bargaining_weights
from auxnb.methods.base import LossTerms, SetupInfo
from auxnb.tasks import Task, TaskSet

NAMES = ("main", "a1", "a2")


class Linear(nn.Module):
    def __init__(self, dim=3, names=NAMES):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.heads = nn.ParameterDict({t: nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64) * (i + 1))
                                       for i, t in enumerate(names)})


def _setup(method, names=NAMES, dim=3):
    model = Linear(dim, names)
    tasks = TaskSet([Task(names[0], "regression", primary=True), *(Task(n, "regression") for n in names[1:])])
    method.setup(model, SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=1, seed=0))
    method.powers.data = method.powers.data.double()
    return model, tasks


def _terms(model, tasks, grads):
    w = model.backbone.w
    losses = {n: (torch.tensor(g, dtype=torch.float64) @ w + 0.5 * (model.heads[n] ** 2).sum()).reshape(1)
              for n, g in grads.items()}
    return LossTerms(tasks=tasks, losses=losses, masks={n: torch.ones(1, dtype=torch.bool) for n in grads},
                     outputs={}, features={}, targets={})


def test_bargaining_weights_solve_the_defining_equation_for_a_general_gram():
    g = torch.tensor([[1.0, 0.5, 0.0], [-0.3, 1.0, 0.2], [0.4, -0.2, 2.0]], dtype=torch.float64)
    gram = g @ g.T
    p = torch.tensor([2.0, 0.5, 0.5], dtype=torch.float64)
    alpha = bargaining_weights(gram, p)
    assert bool((alpha > 0).all())
    # α_k · (M α)_k = p_k: each player's utility share equals its bargaining power
    assert torch.allclose(alpha * (gram @ alpha), p, atol=1e-10)


def test_bargaining_weights_for_orthogonal_gradients_are_sqrt_power_over_squared_norm():
    gram = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    p = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(bargaining_weights(gram, p), torch.sqrt(p / torch.diagonal(gram)), atol=1e-12)


def test_lower_direction_is_the_clipped_bargaining_combination_by_hand():
    method = AuxiNash(max_norm=1.0)
    model, tasks = _setup(method, dim=3)
    g = {"main": [2.0, 0.0, 0.0], "a1": [0.0, 1.0, 0.0], "a2": [0.0, 0.0, 3.0]}
    params = [model.backbone.w, *(model.heads[n] for n in NAMES)]
    d_w, *heads = method.direction(_terms(model, tasks, g), params)
    # gram diag (4, 1, 9) / ‖·‖_F = sqrt(98); p = 1: α_k = sqrt(sqrt(98) / ‖g_k‖²)
    alpha = [math.sqrt(math.sqrt(98) / s) for s in (4.0, 1.0, 9.0)]
    d = torch.tensor([alpha[0] * 2.0, alpha[1] * 1.0, alpha[2] * 3.0], dtype=torch.float64)
    assert torch.allclose(d_w, d / d.norm(), atol=1e-9)  # ‖d‖ = sqrt(3)·98^(1/4) > 1: clipped to 1
    for a, n, h in zip(alpha, NAMES, heads):  # each head: α_k times its own task's gradient, unclipped
        assert torch.allclose(h, a * model.heads[n].detach(), atol=1e-9)


def test_the_upper_graph_differentiates_alpha_in_p_as_finite_differences_of_the_solver():
    method = AuxiNash()
    model, tasks = _setup(method, dim=3)
    with torch.no_grad():
        method.powers.copy_(torch.tensor([1.5, 0.7, 0.8], dtype=torch.float64))
    g = {"main": [1.0, 0.5, 0.0], "a1": [-0.3, 1.0, 0.2], "a2": [0.4, -0.2, 2.0]}
    params = [model.backbone.w]
    # the shared direction is Σ α_k g_k: its Jacobian in p is G^T dα/dp
    d_w = method.direction(_terms(model, tasks, g), params, create_graph=True)[0]
    jac = torch.stack([torch.autograd.grad(d_w[i], [method.powers], retain_graph=True)[0] for i in range(3)])
    G = torch.tensor(list(g.values()), dtype=torch.float64)
    gram = G @ G.T
    gram = gram / gram.norm()
    h = 1e-5  # the solver stops at a residual of ~1e-12: smaller steps measure its noise
    fd = torch.zeros(3, 3, dtype=torch.float64)
    for k in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = h
        p = method.powers.detach()
        fd[:, k] = G.T @ (bargaining_weights(gram, p + e) - bargaining_weights(gram, p - e)) / (2 * h)
    assert torch.allclose(jac, fd, atol=1e-6), (jac, fd)


def test_projection_keeps_powers_positive_and_summing_to_the_number_of_players():
    method = AuxiNash(min_power=1e-4)
    _setup(method)
    with torch.no_grad():
        method.powers.copy_(torch.tensor([4.0, -1.0, 2.0], dtype=torch.float64))
        method.project()
    p = method.powers.detach()
    assert torch.allclose(p, torch.tensor([4.0, 1e-4, 2.0], dtype=torch.float64) / (6.0001) * 3)


def test_registered_with_the_authors_upper_level_and_clear_errors():
    m = methods.get("auxinash")
    assert (m.lower_steps, m.upper_optimizer, m.upper_lr, m.clip, m.hyper_lr, m.leading_eta) == (25, "sgd", 5e-3, 1.0, 1e-4, False)
    with pytest.raises(ValueError, match="min_power must be > 0"):
        AuxiNash(min_power=0.0)
    with pytest.raises(ValueError, match="positive gram diagonal"):
        bargaining_weights(torch.zeros(2, 2), torch.ones(2))


def test_the_module_docstring_examples_run():
    import doctest

    from auxnb.methods import auxinash

    assert doctest.testmod(auxinash).failed == 0



def test_upper_step_hypergradient_is_the_authors_chain_computed_independently():
    # shared w only; task k: L_k = ½ mean (A_k w − b_k)²; the dev loss: the primary task on other data
    from auxnb.train import UpperContext

    names = ("main", "a1", "a2")
    gen = torch.Generator().manual_seed(0)
    data = {n: (torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64))
            for n in names}
    dev = (torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.w = nn.Parameter(torch.tensor([0.2, -0.4, 0.1], dtype=torch.float64))

    model = Shared()
    tasks = TaskSet([Task("main", "regression", primary=True), Task("a1", "regression"), Task("a2", "regression")])
    method = AuxiNash(upper_optimizer=Recorder, hypergrad="exact", hyper_lr=1.0, leading_eta=True, clip=None)
    method.setup(model, SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=5, seed=0))
    method.powers.data = torch.tensor([1.4, 0.9, 0.7], dtype=torch.float64)
    w = model.backbone.w

    def loss(A, b, at):
        return 0.5 * ((A @ at - b) ** 2)

    def terms(batch, names=None):
        losses = {n: loss(*batch[n], w) for n in (names or tasks.names) if n in batch}
        return LossTerms(tasks=tasks, losses=losses, masks={n: torch.ones(5, dtype=torch.bool) for n in losses},
                         outputs={}, features={}, targets={})

    ctx = UpperContext(params=(w,), tasks=tasks, train_batch=lambda: data, dev_batch=lambda: {"main": dev},
                       lr=0.1, step=0, terms=terms)
    method.upper_step(model, ctx)
    (got,) = method.upper_opt.grads[-1]

    # independently: G, the normalised gram, α, dα/dp by finite differences of the solver, and the
    # implicit gradient −vᵀ J⁻¹ ∂g/∂p with J = Σ α_k H_k, H_k = A_kᵀA_k / n, ∂g/∂p = Gᵀ dα/dp
    wd = w.detach()
    G = torch.stack([data[n][0].T @ (data[n][0] @ wd - data[n][1]) / 5 for n in names])
    gram = G @ G.T
    gram = gram / gram.norm()
    p = method.powers.detach()
    alpha = bargaining_weights(gram, p)
    h = 1e-5
    dalpha = torch.stack([(bargaining_weights(gram, p + h * e) - bargaining_weights(gram, p - h * e)) / (2 * h)
                          for e in torch.eye(3, dtype=torch.float64)], 1)
    J = sum(a * data[n][0].T @ data[n][0] / 5 for a, n in zip(alpha, names))
    v = dev[0].T @ (dev[0] @ wd - dev[1]) / 5
    expected = -torch.linalg.solve(J, v) @ (G.T @ dalpha)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-8), (got, expected)


def test_bargaining_weights_reach_the_stationarity_condition_on_random_problems():
    # M α = p / α at the solution (the bargaining condition, independent of how it is found). Near the
    # solution the objective's decrease falls below float64 resolution; an Armijo test on it then stalled the
    # Newton steps at residuals up to 2e-8 on 206 of these 3,000 problems (and at 9e-10 in the finite-
    # difference test above, on an AMD EPYC CPU), which the pure-Newton phase removes.
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(3000):
        n = int(torch.randint(2, 6, (1,), generator=gen))
        x = torch.randn(n, 8, generator=gen, dtype=torch.float64)  # n ≤ 5 < 8: M positive definite
        gram = x @ x.T
        gram = gram / gram.norm()
        powers = torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.05
        alpha = bargaining_weights(gram, powers)
        assert bool((alpha > 0).all())
        worst = max(worst, float((gram @ alpha - powers / alpha).abs().max()))
    assert worst <= 1e-11, worst
