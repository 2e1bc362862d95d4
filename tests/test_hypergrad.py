"""Tests for auxnb.hypergrad against independent maths: closed-form bilevel problems,
dense-matrix formulas, Newton-solved bilevel problems with finite differences."""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from auxnb import hypergrad
from auxnb.hypergrad import (
    DoubleBackwardError,
    HypergradWarning,
    check_step,
    clip_grad_norm_,
    frozen_buffers,
    implicit_grad,
    is_symmetric,
    largest_eigenvalue,
    per_loss_grads,
    solve_cg,
    solve_neumann,
)

DT = torch.float64


# --------------------------------------------------------------------------- problems


class Ridge:
    """Ridge regression with per-feature L2 weights exp(φ_j); θ split in two tensors."""

    def __init__(self, seed: int = 0, n: int = 40, n_dev: int = 25, dtype: torch.dtype = DT) -> None:
        rng = np.random.default_rng(seed)
        d = 5
        self.X = rng.standard_normal((n, d))
        w = rng.standard_normal(d)
        self.y = self.X @ w + 0.3 * rng.standard_normal(n)
        self.Xv = rng.standard_normal((n_dev, d))
        self.yv = self.Xv @ w + 0.3 * rng.standard_normal(n_dev)
        self.phi = np.array([-1.0, -0.5, 0.0, 0.3, 0.7])
        self.n = n
        self.dtype = dtype
        # closed form (numpy, float64)
        lam = np.exp(self.phi)
        self.H = self.X.T @ self.X / n + np.diag(lam)  # J = ∂g/∂θ
        self.theta = np.linalg.solve(self.H, self.X.T @ self.y / n)
        self.v = self.Xv.T @ (self.Xv @ self.theta - self.yv)  # ∂outer/∂θ
        self.G = np.diag(lam * self.theta)  # ∂g/∂φ
        dtheta = -np.linalg.solve(self.H, self.G)  # IFT: dθ*/dφ
        self.hypergrad = self.v @ dtheta

    def graph(self, phi_extra: bool = False):
        t = lambda a: torch.tensor(a, dtype=self.dtype)  # noqa: E731
        a = t(self.theta[:3]).requires_grad_()
        b = t(self.theta[3:]).reshape(1, 2).requires_grad_()
        phi = t(self.phi).requires_grad_()
        theta = torch.cat([a, b.reshape(-1)])
        inner = 0.5 * ((t(self.X) @ theta - t(self.y)) ** 2).mean() + 0.5 * (phi.exp() * theta**2).sum()
        g = torch.autograd.grad(inner, (a, b), create_graph=True)
        outer = 0.5 * ((t(self.Xv) @ theta - t(self.yv)) ** 2).sum()
        return outer, g, (a, b), (phi,)

    def truncated(self, terms: int, lr: float) -> np.ndarray:
        """-lr · vᵀ Σ_{i≤K} (I − lr·J)^i ∂g/∂φ with explicit matrices."""
        return _truncated(self.v, self.H, self.G, terms, lr)


def _truncated(v: np.ndarray, J: np.ndarray, G: np.ndarray, terms: int, lr: float) -> np.ndarray:
    M = np.eye(len(v)) - lr * J
    S = sum(np.linalg.matrix_power(M, i) for i in range(terms + 1))
    return -lr * v @ S @ G


class LinearField:
    """Non-symmetric g = Aθ − b + φ⊙θ, outer ½‖θ − t‖²."""

    def __init__(self, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        d = 4
        Q = rng.standard_normal((d, d))
        R = rng.standard_normal((d, d))
        self.A = Q @ Q.T / d + 0.5 * np.eye(d) + 0.8 * (R - R.T)  # xᵀAx > 0: Re λ > 0
        self.b = rng.standard_normal(d)
        self.t = rng.standard_normal(d)
        self.phi = np.array([0.2, 0.5, 0.1, 0.3])
        self.J = self.A + np.diag(self.phi)
        self.theta = np.linalg.solve(self.J, self.b)
        self.v = self.theta - self.t
        self.G = np.diag(self.theta)
        self.hypergrad = -self.v @ np.linalg.solve(self.J, self.G)

    def graph(self):
        t = lambda a: torch.tensor(a, dtype=DT)  # noqa: E731
        a = t(self.theta[:1]).requires_grad_()
        b = t(self.theta[1:]).requires_grad_()
        phi = t(self.phi).requires_grad_()
        theta = torch.cat([a, b])
        g = t(self.A) @ theta - t(self.b) + phi * theta
        outer = 0.5 * ((theta - t(self.t)) ** 2).sum()
        return outer, (g[:1], g[1:]), (a, b), (phi,)


def _cat(ts) -> np.ndarray:
    return torch.cat([t.reshape(-1) for t in ts]).detach().numpy()


# --------------------------------------------------------------------------- 1. ridge


def test_exact_matches_closed_form_ridge_hypergradient():
    prob = Ridge()
    (h,) = implicit_grad(*prob.graph(), method="exact")
    assert h.shape == (5,) and h.dtype == DT
    np.testing.assert_allclose(h.numpy(), prob.hypergrad, rtol=1e-8, atol=1e-12)


def test_neumann_with_many_terms_and_safe_lr_converges_to_closed_form_ridge():
    prob = Ridge()
    lr = 1.0 / np.linalg.eigvalsh(prob.H).max()
    (h,) = implicit_grad(*prob.graph(), method="neumann", terms=2000, lr=lr)
    np.testing.assert_allclose(h.numpy(), prob.hypergrad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("terms", [0, 1, 3])
@pytest.mark.parametrize("lr", [0.3, 1.0])
def test_truncated_neumann_equals_dense_matrix_series_ridge(terms, lr):
    prob = Ridge()
    (h,) = implicit_grad(*prob.graph(), method="neumann", terms=terms, lr=lr)
    np.testing.assert_allclose(h.numpy(), prob.truncated(terms, lr), rtol=1e-10, atol=1e-13)


def test_cg_matches_closed_form_ridge_hypergradient():
    prob = Ridge()
    (h,) = implicit_grad(*prob.graph(), method="cg", solver_kwargs={"tol": 1e-13, "maxiter": 50})
    np.testing.assert_allclose(h.numpy(), prob.hypergrad, rtol=1e-8, atol=1e-12)


def test_pluggable_solver_function_matches_closed_form():
    prob = Ridge()
    (h,) = implicit_grad(*prob.graph(), method=solve_cg(maxiter=50, tol=1e-13))
    np.testing.assert_allclose(h.numpy(), prob.hypergrad, rtol=1e-8, atol=1e-12)


def test_a_caller_supplied_hparam_product_replaces_the_last_vjp_and_none_falls_back_to_it():
    """``hparam_product`` gets u = J⁻ᵀv (here H⁻¹v, closed form) and returns uᵀ∂g/∂φ = u ⊙ e^φ ⊙ θ (ridge)."""
    prob = Ridge()
    seen = []

    def product(u):
        seen.append(torch.cat([t.reshape(-1) for t in u]).detach().numpy())
        flat = torch.cat([t.reshape(-1) for t in u])
        return (flat * torch.tensor(np.exp(prob.phi) * prob.theta),)

    (h,) = implicit_grad(*prob.graph(), method="exact", hparam_product=product)
    np.testing.assert_allclose(seen[0], np.linalg.solve(prob.H.T, prob.v), rtol=1e-10)
    np.testing.assert_allclose(h.numpy(), prob.hypergrad, rtol=1e-8, atol=1e-12)
    (h,) = implicit_grad(*prob.graph(), method="exact", hparam_product=lambda u: None)
    np.testing.assert_allclose(h.numpy(), prob.hypergrad, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="one tensor per hparam, shaped like it"):
        implicit_grad(*prob.graph(), method="exact", hparam_product=lambda u: (torch.zeros(4, dtype=DT),))


def test_float32_exact_matches_closed_form_within_single_precision():
    prob = Ridge(dtype=torch.float32)
    (h,) = implicit_grad(*prob.graph(), method="exact")
    assert h.dtype == torch.float32
    np.testing.assert_allclose(h.numpy(), prob.hypergrad, rtol=1e-4, atol=1e-6)


def test_retain_graph_allows_a_second_call_on_the_same_graph():
    prob = Ridge()
    outer, g, params, hparams = prob.graph()
    (h1,) = implicit_grad(outer, g, params, hparams, method="exact", retain_graph=True)
    (h2,) = implicit_grad(outer, g, params, hparams, method="cg", solver_kwargs={"tol": 1e-13})
    np.testing.assert_allclose(h1.numpy(), h2.numpy(), rtol=1e-8)


# --------------------------------------------------------------------------- 2. non-symmetric


def test_nonsymmetric_field_exact_and_neumann_match_closed_form_using_transpose():
    prob = LinearField()
    assert np.abs(prob.A - prob.A.T).max() > 0.1
    wrong = -prob.v @ np.linalg.solve(prob.J.T, prob.G)  # what assuming J = Jᵀ would give
    assert np.abs(wrong - prob.hypergrad).max() > 1e-2

    (h_exact,) = implicit_grad(*prob.graph(), method="exact")
    np.testing.assert_allclose(h_exact.numpy(), prob.hypergrad, rtol=1e-9, atol=1e-12)

    eig = np.linalg.eigvals(prob.J)
    assert (eig.real > 0).all()
    lr = float(np.min(eig.real / np.abs(eig) ** 2))  # minimises max |1 − lr·λ| enough to converge
    rho = np.abs(1 - lr * eig).max()
    assert rho < 0.995
    terms = int(math.ceil(math.log(1e-14) / math.log(rho)))
    (h_neumann,) = implicit_grad(*prob.graph(), method="neumann", terms=terms, lr=lr)
    np.testing.assert_allclose(h_neumann.numpy(), prob.hypergrad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("terms", [0, 1, 3])
def test_truncated_neumann_equals_dense_matrix_series_nonsymmetric(terms):
    prob = LinearField()
    (h,) = implicit_grad(*prob.graph(), method="neumann", terms=terms, lr=0.2)
    np.testing.assert_allclose(h.numpy(), _truncated(prob.v, prob.J, prob.G, terms, 0.2), rtol=1e-10, atol=1e-13)


def test_cg_refuses_nonsymmetric_jacobian_and_symmetry_probe_tells_them_apart():
    prob = LinearField()
    outer, g, params, hparams = prob.graph()
    assert not is_symmetric(g, params)
    with pytest.raises(ValueError, match="not symmetric.*neumann"):
        implicit_grad(outer, g, params, hparams, method="cg")
    _, g_ridge, params_ridge, _ = Ridge().graph()
    assert is_symmetric(g_ridge, params_ridge)


# --------------------------------------------------------------------------- 3. finite differences


class Logistic:
    """L2-regularised logistic regression, per-feature weights exp(φ); inner solved by Newton."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.X = torch.randn(20, 3, generator=gen, dtype=DT)
        w = torch.tensor([1.5, -2.0, 0.5], dtype=DT)
        flip = torch.rand(20, generator=gen, dtype=DT) < 0.2
        self.y = torch.where((self.X @ w > 0) ^ flip, 1.0, -1.0).to(DT)
        self.Xv = torch.randn(15, 3, generator=gen, dtype=DT)
        self.yv = torch.where(self.Xv @ w > 0, 1.0, -1.0).to(DT)
        self.phi = torch.tensor([-2.0, -1.0, 0.5], dtype=DT)

    def solve(self, phi: torch.Tensor) -> torch.Tensor:
        lam = phi.exp()
        theta = torch.zeros(3, dtype=DT)
        for _ in range(100):
            z = self.y * (self.X @ theta)
            s = torch.sigmoid(-z)
            grad = -(self.X.T @ (self.y * s)) / 20 + lam * theta
            hess = (self.X.T * (s * (1 - s))) @ self.X / 20 + torch.diag(lam)
            step = torch.linalg.solve(hess, grad)
            theta = theta - step
            if step.abs().max() < 1e-15:
                break
        return theta

    def outer(self, theta: torch.Tensor) -> torch.Tensor:
        return F.softplus(-self.yv * (self.Xv @ theta)).mean()

    def graph(self):
        theta = self.solve(self.phi).requires_grad_()
        phi = self.phi.clone().requires_grad_()
        inner = F.softplus(-self.y * (self.X @ theta)).mean() + 0.5 * (phi.exp() * theta**2).sum()
        (g,) = torch.autograd.grad(inner, theta, create_graph=True)
        return self.outer(theta), (g,), (theta,), (phi,)


def test_exact_and_neumann_match_finite_differences_of_newton_solved_logistic_bilevel():
    prob = Logistic()
    h = 1e-5
    fd = np.array(
        [
            (
                prob.outer(prob.solve(prob.phi + h * e)) - prob.outer(prob.solve(prob.phi - h * e))
            ).item()
            / (2 * h)
            for e in torch.eye(3, dtype=DT)
        ]
    )
    assert np.abs(fd).max() > 1e-3  # a non-trivial hypergradient
    (h_exact,) = implicit_grad(*prob.graph(), method="exact")
    np.testing.assert_allclose(h_exact.numpy(), fd, rtol=1e-5, atol=1e-9)

    theta = prob.solve(prob.phi)
    s = torch.sigmoid(-prob.y * (prob.X @ theta))
    hess = (prob.X.T * (s * (1 - s))) @ prob.X / 20 + torch.diag(prob.phi.exp())
    lr = 1.0 / torch.linalg.eigvalsh(hess).max().item()
    (h_neumann,) = implicit_grad(*prob.graph(), method="neumann", terms=3000, lr=lr)
    np.testing.assert_allclose(h_neumann.numpy(), fd, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- 4. unused inputs


@pytest.mark.parametrize("method", ["neumann", "exact", "cg"])
def test_unused_hparam_gives_zeros_and_param_without_path_to_outer_is_handled(method):
    prob = Ridge()
    t = lambda a: torch.tensor(a, dtype=DT)  # noqa: E731
    a = t(prob.theta[:3]).requires_grad_()
    b = t(prob.theta[3:]).reshape(1, 2).requires_grad_()
    z = torch.zeros(2, dtype=DT, requires_grad=True)  # in the inner loss only; its optimum is 0
    phi = t(prob.phi).requires_grad_()
    unused = torch.ones(2, 2, dtype=DT, requires_grad=True)
    theta = torch.cat([a, b.reshape(-1)])
    inner = (
        0.5 * ((t(prob.X) @ theta - t(prob.y)) ** 2).mean()
        + 0.5 * (phi.exp() * theta**2).sum()
        + 0.5 * (phi[:2].exp() * z**2).sum()
    )
    g = torch.autograd.grad(inner, (a, z, b), create_graph=True)
    outer = 0.5 * ((t(prob.Xv) @ theta - t(prob.yv)) ** 2).sum()
    kwargs = {"terms": 2000, "lr": 1.0 / np.linalg.eigvalsh(prob.H).max()} if method == "neumann" else {}
    h, h_unused = implicit_grad(outer, g, (a, z, b), (phi, unused), method=method, **kwargs)
    assert h_unused.shape == (2, 2) and torch.equal(h_unused, torch.zeros(2, 2, dtype=DT))
    np.testing.assert_allclose(h.numpy(), prob.hypergrad, rtol=1e-7, atol=1e-12)


def test_direct_dependence_of_outer_on_hparam_is_added():
    prob = Ridge()
    outer, g, params, (phi,) = prob.graph()
    (h,) = implicit_grad(outer + 0.5 * 3.0 * (phi**2).sum(), g, params, (phi,), method="exact")
    np.testing.assert_allclose(h.numpy(), prob.hypergrad + 3.0 * prob.phi, rtol=1e-8)


def test_outer_loss_without_path_to_params_gives_only_the_direct_term():
    prob = Ridge()
    _, g, params, (phi,) = prob.graph()
    (h,) = implicit_grad((phi**2).sum(), g, params, (phi,), terms=2)
    np.testing.assert_allclose(h.detach().numpy(), 2 * prob.phi, rtol=1e-12)


def test_bad_arguments_raise_clear_errors():
    prob = Ridge()
    with pytest.raises(ValueError, match="unknown method 'newton'.*'neumann', 'exact', 'cg'"):
        implicit_grad(*prob.graph(), method="newton")
    with pytest.raises(ValueError, match=r"dense 5×5 .*limit of 4.*neumann"):
        implicit_grad(*prob.graph(), method="exact", solver_kwargs={"max_params": 4})
    with pytest.raises(ValueError, match="unknown solver_kwargs.*maxiter"):
        implicit_grad(*prob.graph(), method="neumann", solver_kwargs={"maxiter": 3})
    outer, g, params, hparams = prob.graph()
    with pytest.raises(ValueError, match="create_graph=True"):
        implicit_grad(outer, tuple(x.detach() for x in g), params, hparams)
    with pytest.raises(ValueError, match="terms"):
        implicit_grad(outer, g, params, hparams, terms=-1)
    with pytest.raises(ValueError, match="shape"):
        implicit_grad(outer, g[::-1], params, hparams)


# --------------------------------------------------------------------------- 5. per-loss gradients


class _DataDependentSquare(torch.autograd.Function):
    """x² whose backward branches on data: vmap (is_grads_batched) cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        scale = 2.0 if bool((grad_out != 0).any()) else 0.0
        return scale * x * grad_out


def _per_loss_problem(custom: bool = False):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 6).to(DT)
    heads = [torch.nn.Linear(6, 1).to(DT) for _ in range(3)]
    unused = torch.zeros(3, dtype=DT, requires_grad=True)
    params = (*trunk.parameters(), *(p for h in heads for p in h.parameters()), unused)
    x = torch.randn(8, 4, dtype=DT)

    def losses():
        feat = torch.tanh(trunk(x))
        if custom:
            feat = _DataDependentSquare.apply(feat)
        return [(h(feat) ** 2).mean() * (i + 1) for i, h in enumerate(heads)]

    return params, losses


@pytest.mark.parametrize("custom", [False, True], ids=["vmap", "vmap-fails-falls-back"])
def test_per_loss_grads_batched_equals_loop_equals_separate_autograd_calls(custom):
    params, losses = _per_loss_problem(custom)
    batched = per_loss_grads(losses(), params)
    loop = per_loss_grads(losses(), params, batched=False)
    separate = []
    for k in range(3):
        grads = torch.autograd.grad(losses()[k], params, allow_unused=True)
        separate.append(tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)))
    assert len(batched) == len(loop) == 3
    for b, lo, s in zip(batched, loop, separate):
        for gb, gl, gs in zip(b, lo, s):
            torch.testing.assert_close(gb, gs, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(gl, gs, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(b[-1], torch.zeros(3, dtype=DT)) for b in batched)  # unused → zeros
    assert not torch.equal(batched[0][2], batched[1][2])  # head 0 grads differ between losses


def test_per_loss_grads_with_create_graph_gives_the_same_second_derivatives_both_ways():
    params, losses = _per_loss_problem()
    second = []
    for batched in (True, False):
        grads = per_loss_grads(losses(), params, batched=batched, create_graph=True)
        weighted = sum((k + 1.0) * (grads[k][0] ** 2).sum() for k in range(3))
        second.append(torch.autograd.grad(weighted, params[0]))
    torch.testing.assert_close(second[0], second[1], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- 6. step size


def test_largest_eigenvalue_matches_eigvalsh_of_ridge_hessian():
    prob = Ridge()
    _, g, params, _ = prob.graph()
    lam = largest_eigenvalue(g, params, iters=500, tol=1e-13)
    assert lam == pytest.approx(np.linalg.eigvalsh(prob.H).max(), rel=1e-6)


def test_largest_eigenvalue_from_the_top_eigenvector_is_exact_after_one_product():
    prob = Ridge()
    evals, evecs = np.linalg.eigh(prob.H)
    _, g, params, _ = prob.graph()
    v = torch.tensor(evecs[:, -1], dtype=params[0].dtype)
    top = (v[:3], v[3:].reshape(1, 2))  # aligned with params (a [3], b [1, 2])
    # one product from the eigenvector: its Rayleigh quotient is λ_max (hand truth: eigh)
    assert largest_eigenvalue(g, params, iters=1, start=top) == pytest.approx(evals[-1], rel=1e-10)
    # while one product from a random start is not
    assert largest_eigenvalue(g, params, iters=1) < 0.99 * evals[-1]
    # a start of any scale is the same start; an all-zero one falls back to the generator's random start
    assert largest_eigenvalue(g, params, iters=1, start=tuple(-7.5 * t for t in top)) == pytest.approx(evals[-1], rel=1e-10)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    zeros = tuple(torch.zeros_like(t) for t in top)
    assert largest_eigenvalue(g, params, iters=3, start=zeros, generator=gen()) == \
        largest_eigenvalue(g, params, iters=3, generator=gen())


def test_largest_eigenvalue_stops_at_tol_and_never_exceeds_lambda_max(monkeypatch):
    import auxnb.hypergrad as hg

    prob = Ridge()
    lam = np.linalg.eigvalsh(prob.H).max()
    calls = []
    vjp = hg._vjp
    monkeypatch.setattr(hg, "_vjp", lambda *a, **k: calls.append(1) or vjp(*a, **k))
    used = []
    for tol in (1e-1, 1e-2, 1e-4, 1e-8):
        _, g, params, _ = prob.graph()
        calls.clear()
        est = largest_eigenvalue(g, params, iters=500, tol=tol, generator=torch.Generator().manual_seed(1))
        used.append(len(calls))
        # a Rayleigh quotient of a symmetric matrix never exceeds its largest eigenvalue
        assert est <= lam * (1 + 1e-12)
        assert 2 <= len(calls) < 500  # stopped by tol, not by iters
    # a looser tol never takes more products, and the tightest one reaches λ_max
    assert used == sorted(used) and est == pytest.approx(lam, rel=1e-6)
    _, g, params, _ = prob.graph()
    with pytest.raises(ValueError, match="start has shapes"):
        largest_eigenvalue(g, params, start=(torch.zeros(3),))


def test_check_step_warns_exactly_when_neumann_series_diverges():
    prob = Ridge()
    lam_max = np.linalg.eigvalsh(prob.H).max()
    _, g, params, _ = prob.graph()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradWarning)
        est = check_step(g, params, 1.0 / lam_max, iters=200, tol=1e-12)
        check_step(g, params, 1.9 / lam_max, iters=200, tol=1e-12)
    assert est == pytest.approx(lam_max, rel=1e-5)
    with pytest.warns(HypergradWarning, match="diverges"):
        check_step(g, params, 2.2 / lam_max, iters=200, tol=1e-12)

    norms = [
        float(implicit_grad(*prob.graph(), terms=k, lr=2.2 / lam_max)[0].norm()) for k in (5, 10, 20, 40)
    ]
    assert all(b > a for a, b in zip(norms, norms[1:]))
    assert norms[-1] > 100 * norms[0]


# --------------------------------------------------------------------------- 7. buffers


def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2)
    ).train()


def test_frozen_buffers_leaves_batchnorm_buffers_bit_identical_in_train_mode():
    model = _bn_model()
    refs = dict(model.named_buffers())
    before = {k: v.clone() for k, v in refs.items()}
    assert len(before) == 6
    with frozen_buffers(model):
        for _ in range(2):
            model(torch.randn(16, 3)).sum().backward()
        assert not torch.equal(model[1].running_mean, before["1.running_mean"])  # it did change inside
        model[1].running_var = torch.full((4,), 7.0)  # even a re-assigned buffer comes back
    for k, v in model.named_buffers():
        assert v is refs[k]
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype


def test_frozen_buffers_restores_after_an_exception_inside():
    model = _bn_model()
    before = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(KeyError):
        with frozen_buffers(model[1], model[4]):
            model(torch.randn(16, 3))
            raise KeyError("boom")
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k])


def test_forward_outside_frozen_buffers_does_change_buffers():
    model = _bn_model()
    before = {k: v.clone() for k, v in model.named_buffers()}
    model(torch.randn(16, 3))
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    assert int(model[1].num_batches_tracked) == 1


# --------------------------------------------------------------------------- 8. double backward


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad_out


def _cube_graph(outer_through_op: bool = True):
    theta = torch.tensor([0.5, -0.3, 0.8], dtype=DT, requires_grad=True)
    phi = torch.zeros(3, dtype=DT, requires_grad=True)
    inner = 0.5 * ((_Cube.apply(theta) - 1) ** 2).sum() + 0.5 * (phi.exp() * theta**2).sum()
    (g,) = torch.autograd.grad(inner, theta, create_graph=True)
    # The dev loss of the same model goes through the op: that is where its name is found.
    outer = ((_Cube.apply(theta) - 0.5) ** 2).sum() if outer_through_op else (theta**2).sum()
    return outer, (g,), (theta,), (phi,)


@pytest.mark.parametrize("method", ["neumann", "exact", "cg"])
def test_once_differentiable_custom_op_raises_double_backward_error_naming_it(method):
    # Such a backward silently cuts g's dependence on θ and φ: without the check the
    # hypergradient would be a wrong zero, not an exception.
    with pytest.raises(DoubleBackwardError, match=r"'_Cube'.*once_differentiable.*terms=0"):
        implicit_grad(*_cube_graph(), method=method)
    with pytest.raises(DoubleBackwardError, match=r"once_differentiable.*terms=0"):
        implicit_grad(*_cube_graph(outer_through_op=False), method=method)


def _embedding_bag_graph():
    weight = torch.randn(10, 3, dtype=DT, requires_grad=True)
    phi = torch.ones(1, dtype=DT, requires_grad=True)
    out = F.embedding_bag(torch.tensor([1, 2, 3, 4]), weight, torch.tensor([0, 2]), mode="max")
    (g,) = torch.autograd.grad(phi * (out**2).sum(), weight, create_graph=True)
    return out.sum(), (g,), (weight,), (phi,)


def _ctc_graph():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, 4, dtype=DT, generator=gen, requires_grad=True)
    phi = torch.ones(1, dtype=DT, requires_grad=True)
    loss = F.ctc_loss(logits.log_softmax(2), torch.tensor([[1, 2, 3]]), torch.tensor([6]), torch.tensor([3]))
    (g,) = torch.autograd.grad(phi * loss, logits, create_graph=True)
    return (logits**2).sum(), (g,), (logits,), (phi,)


@pytest.mark.parametrize(
    "make, op", [(_embedding_bag_graph, "_embedding_bag_backward"), (_ctc_graph, "_ctc_loss_backward")]
)
def test_builtin_op_without_double_backward_raises_double_backward_error_naming_it(make, op):
    with pytest.raises(DoubleBackwardError, match=f"{op}.*terms=0"):
        implicit_grad(*make(), terms=2)
    assert issubclass(DoubleBackwardError, RuntimeError)


# --------------------------------------------------------------------------- misc


def test_clip_grad_norm_is_pure_and_scales_to_max_norm():
    grads = (torch.tensor([3.0, 0.0]), torch.tensor([[4.0]]))
    clipped, norm = clip_grad_norm_(grads, 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.equal(grads[0], torch.tensor([3.0, 0.0]))  # inputs untouched
    torch.testing.assert_close(clipped[0], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped[1], torch.tensor([[0.8]]))
    small, norm_small = clip_grad_norm_(grads, 10.0)
    assert all(torch.equal(a, b) for a, b in zip(small, grads)) and norm_small.item() == pytest.approx(5.0)


def test_clip_grad_norm_exact_scales_up_and_down_to_max_norm_and_leaves_zero_at_zero():
    grads = (torch.tensor([3.0, 0.0]), torch.tensor([[4.0]]))  # joint norm 5 (3-4-5)
    for target in (1.0, 10.0):  # down and up
        scaled, norm = clip_grad_norm_(grads, target, exact=True)
        assert norm.item() == pytest.approx(5.0)
        torch.testing.assert_close(scaled[0], torch.tensor([3.0, 0.0]) * target / 5)
        torch.testing.assert_close(scaled[1], torch.tensor([[4.0]]) * target / 5)
    zero, norm_zero = clip_grad_norm_((torch.zeros(3),), 2.0, exact=True)
    assert norm_zero.item() == 0.0 and torch.equal(zero[0], torch.zeros(3))  # no direction to scale: no NaN


# --------------------------------------------------------------------------- 9. doctests


def test_docstring_examples_run():
    result = doctest.testmod(hypergrad, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


# --------------------------------------------------------------------------- diagnostics that must speak (issue 12, defect 8)


def _symmetric_field(eigenvalues, seed: int = 0):
    """g(θ) = A θ with A = Q diag(eigenvalues) Qᵀ for a random rotation Q: J = A, symmetric, not axis-aligned."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=DT))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T
    theta = torch.randn(len(eigenvalues), generator=gen, dtype=DT).requires_grad_()
    return a, theta, (a @ theta,)


def test_check_step_warns_on_a_negative_eigenvalue_that_is_not_the_dominant_one():
    # dominant eigenvalue 5 > 0 and lr·λ_max = 0.5 < 2: the old check (dominant only) stayed silent
    a, theta, g = _symmetric_field([5.0, 1.0, 0.3, -0.5])
    with pytest.warns(HypergradWarning, match="negative eigenvalue"):
        lam = check_step(g, (theta,), lr=0.1, iters=300, tol=1e-12)
    assert lam == pytest.approx(5.0, rel=1e-6)
    # independent truth: the truncated series Σ_{i≤K} (I − lr·A)^i b really grows (|1 − lr·(−0.5)| = 1.05)
    b = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=DT)
    series = lambda k: torch.linalg.matrix_power(torch.eye(4, dtype=DT) - 0.1 * a, k)  # noqa: E731
    norms = [float(sum((series(i) @ b for i in range(k + 1)), torch.zeros(4, dtype=DT)).norm()) for k in (50, 100, 200)]
    assert norms[0] < norms[1] < norms[2] and norms[2] > 100 * norms[0]
    # the same spectrum shifted positive: silent, and its series converges to A⁻¹ b / lr
    _, theta2, g2 = _symmetric_field([5.0, 1.0, 0.3, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradWarning)
        check_step(g2, (theta2,), lr=0.1, iters=300, tol=1e-12)


def test_smallest_eigenvalue_matches_eigvalsh_and_never_undershoots_for_a_symmetric_j():
    a, theta, g = _symmetric_field([3.0, -0.2, 0.7, 1.5, 2.0], seed=3)
    exact = float(torch.linalg.eigvalsh(a).min())
    assert hypergrad.smallest_eigenvalue(g, (theta,), iters=2000, tol=1e-14) == pytest.approx(exact, rel=1e-6)
    for iters in (2, 5, 10):  # the estimate approaches from above: a negative estimate is a real negative eigenvalue
        assert hypergrad.smallest_eigenvalue(g, (theta,), iters=iters, tol=0.0) >= exact - 1e-12


def test_solve_cg_warns_and_reports_when_it_stops_unconverged():
    a = torch.diag(torch.linspace(1.0, 100.0, 50, dtype=DT))
    b = torch.ones(50, dtype=DT)
    solver = solve_cg(maxiter=3, tol=1e-10)
    with pytest.warns(HypergradWarning, match="did not converge.*relative residual"):
        (x,) = solver(lambda u: (a @ u[0],), (b,))
    residual = float((b - a @ x).norm() / b.norm())  # independent: the residual of what came back
    assert solver.info["converged"] is False and solver.info["iterations"] == 3
    assert solver.info["residual"] == pytest.approx(residual, rel=1e-9) and residual > 1e-10
    solver = solve_cg(maxiter=200, tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradWarning)
        (x,) = solver(lambda u: (a @ u[0],), (b,))
    assert solver.info["converged"] is True and float((b - a @ x).norm() / b.norm()) <= 1e-10
    # and through implicit_grad(method="cg")
    prob = Ridge()
    with pytest.warns(HypergradWarning, match="did not converge"):
        implicit_grad(*prob.graph(), method="cg", solver_kwargs={"maxiter": 1, "tol": 1e-12})


def test_implicit_grad_warns_when_g_does_not_depend_on_phi():
    prob = Ridge()
    outer, g, params, (phi,) = prob.graph()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradWarning)
        implicit_grad(outer, g, params, (phi,), method="exact")  # φ in g: silent
    # the same lower loss with φ detached: ∂g/∂φ ≡ 0 by structure, the result is exactly zero
    t = lambda v: torch.tensor(v, dtype=DT)  # noqa: E731
    theta = t(prob.theta).requires_grad_()
    phi = t(prob.phi).requires_grad_()
    inner = 0.5 * ((t(prob.X) @ theta - t(prob.y)) ** 2).mean() + 0.5 * (phi.detach().exp() * theta**2).sum()
    (g,) = torch.autograd.grad(inner, (theta,), create_graph=True)
    outer = 0.5 * ((t(prob.Xv) @ theta - t(prob.yv)) ** 2).sum()
    for method in ("neumann", "exact"):
        with pytest.warns(HypergradWarning, match="does not depend on any of the hparams"):
            (h,) = implicit_grad(outer, (g,), (theta,), (phi,), method=method, retain_graph=True)
        assert torch.equal(h, torch.zeros_like(phi))


def test_neumann_warm_start_is_the_richardson_iteration_from_start_and_fed_back_the_longer_series():
    """solve_neumann(K, η, start=s) = (I − ηA)^K s + η Σ_{i<K} (I − ηA)^i b (explicit matrix powers), and feeding
    each result back as the next start, n calls of K terms are the series with nK terms, which tends to A⁻¹b."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([0.05, 0.2, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)) @ q.T
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    s = torch.randn(6, generator=gen, dtype=torch.float64)
    eta, k = 0.6, 3
    step = torch.eye(6, dtype=torch.float64) - eta * a

    def matvec(u):
        return (a @ u[0],)

    (got,) = solve_neumann(k, eta, start=(s,))(matvec, (b,))
    expected = torch.linalg.matrix_power(step, k) @ s + eta * sum(torch.linalg.matrix_power(step, i) @ b for i in range(k))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    x = solve_neumann(k, eta)(matvec, (b,))  # the first call: the series from 0
    for _ in range(4):
        x = solve_neumann(k, eta, start=x)(matvec, (b,))
    torch.testing.assert_close(x[0], solve_neumann(5 * k, eta)(matvec, (b,))[0], rtol=1e-12, atol=1e-12)
    for _ in range(400):  # (1 − 0.6·0.05)^1215 ≈ 1e-16: the smallest eigenvalue's error has gone
        x = solve_neumann(k, eta, start=x)(matvec, (b,))
    torch.testing.assert_close(x[0], torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="start must be shaped like b"):
        solve_neumann(k, eta, start=(s[:3],))(matvec, (b,))
