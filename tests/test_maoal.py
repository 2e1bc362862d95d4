"""MAOAL against independent truth: the lower step by hand (closed-form gradients), the
hypergradient against finite differences of the dev loss after T unrolled lower steps (exact at
the best response, within a stated bound off it), Model-L against a learned per-loss weighting,
the module-level effect on a synthetic task built for it, and the upper step's side effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from auxnb.data import DataBundle, RotationView, SyntheticSource, TaskDataset
from auxnb.methods import MAOAL, AuxL, get, l2_penalty
from auxnb.methods.base import LossTerms, SetupInfo, compute_terms
from auxnb.models import MLP, ConvNet4, MultiHeadModel, make_head
from auxnb.partition import custom
from auxnb.tasks import MISSING_CLASS, PRIMARY_STREAM, Task, TaskSet
from auxnb.train import Trainer, UpperContext

from helpers import Recorder, setup_info

DT = torch.float64


_info = setup_info


def _context(model, tasks, train_batch, dev_batch, lr, terms=None) -> UpperContext:
    terms = terms or (lambda b, **kw: compute_terms(model, b, tasks, **kw))
    params = tuple(p for p in model.parameters() if p.requires_grad)
    return UpperContext(params=params, tasks=tasks, train_batch=lambda: train_batch, dev_batch=lambda: dev_batch,
                        lr=lr, step=0, terms=terms)


# --------------------------------------------------------------------------- the lower step by hand


REG_TASKS = TaskSet([Task("y", "regression", primary=True), Task("a1", "regression"), Task("a2", "regression")])


def _mse_grads_by_hand(model: MultiHeadModel, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Closed-form gradients of each task's mean squared error for ``f = relu(W x + b)``,
    ``out_k = v_k·f + c_k`` (no autograd): {task: {parameter name: gradient}}."""
    lin = model.backbone.layer1[0]
    W, b = lin.weight.detach(), lin.bias.detach()
    z = x @ W.T + b
    h = z.clamp_min(0.0)
    relu = (z > 0).to(x.dtype)
    n = x.shape[0]
    out = {}
    for task in REG_TASKS.names:
        head = model.heads[task]
        v, c = head.weight.detach()[0], head.bias.detach()
        r = h @ v + c - targets[task]  # residuals
        dz = (2.0 / n) * r[:, None] * v[None, :] * relu
        grads = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        grads["backbone.layer1.0.weight"] = dz.T @ x
        grads["backbone.layer1.0.bias"] = dz.sum(0)
        grads[f"heads.{task}.weight"] = ((2.0 / n) * r @ h)[None, :]
        grads[f"heads.{task}.bias"] = (2.0 / n) * r.sum().reshape(1)
        out[task] = grads
    return out


def _regression_model(seed: int = 0) -> MultiHeadModel:
    torch.manual_seed(seed)
    return MultiHeadModel(MLP(3, hidden=(4,)), {t: make_head(4, 1) for t in REG_TASKS.names})


def _two_modules(model: nn.Module):
    return custom(model, {"trunk": "backbone", "heads": "heads"})


def test_one_lower_step_equals_theta_minus_lr_times_module_weighted_gradient_by_hand():
    # Two modules (trunk, heads), two auxiliary losses, distinct α_ij: one SGD step through the
    # real Trainer must equal θ − lr·(∇L_goal + Σ_i Σ_j α_ij ∇_{θ^j} L_ai) with gradients by hand.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=g)
    targets = {t: torch.randn(24, generator=g) for t in REG_TASKS.names}
    train = TaskDataset(x[:16], {k: v[:16] for k, v in targets.items()})
    dev = TaskDataset(x[16:20], {k: v[16:20] for k, v in targets.items()})
    val = TaskDataset(x[20:], {k: v[20:] for k, v in targets.items()})
    bundle = DataBundle(REG_TASKS, train=train, dev=dev, val=val, test=val)
    alpha = [[0.3, 1.7], [2.0, 0.5]]  # rows a1, a2; columns trunk, heads
    model = _regression_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the paper's upper level on a held-out D_dev (the default, upper_data="train", would merge D_dev
    # into D_train and change the lower batch)
    method = MAOAL(_two_modules, init=alpha, lower_steps=5, upper_data="dev", fallback=None)
    lr = 0.1
    Trainer(model, method, bundle, steps=1, batch_size=16, optimizer="sgd", lr=lr, momentum=0.0,
            seed=0, device="cpu", progress=False).fit()
    assert method.group_names == ("trunk", "heads") and method.loss_names == ["a1", "a2"]

    start = _regression_model()  # same initial weights
    by_hand = _mse_grads_by_hand(start, x[:16], {k: v[:16] for k, v in targets.items()})
    for name, p in model.named_parameters():
        j = 0 if name.startswith("backbone") else 1
        direction = by_hand["y"][name] + alpha[0][j] * by_hand["a1"][name] + alpha[1][j] * by_hand["a2"][name]
        torch.testing.assert_close(p.detach(), before[name] - lr * direction, rtol=1e-5, atol=1e-6)


def test_l2_penalty_auxiliary_loss_adds_two_scale_alpha_theta_per_module():
    # aux loss = scale·Σ‖θ_backbone‖²: its weighted gradient is 2·scale·α_{l2,j}·θ^j on the
    # backbone modules and nothing on the heads; the primary gradient is unweighted.
    tasks = TaskSet([Task("y", "regression", primary=True)])
    torch.manual_seed(0)
    model = MultiHeadModel(MLP(3, hidden=(4, 5)), {"y": make_head(5, 1)})
    method = MAOAL("block", aux_losses={"l2": l2_penalty("backbone", scale=0.05)}, init=[[0.5, 2.0, 3.0]])
    method.setup(model, _info(tasks))
    assert method.group_names == ("layer1", "layer2", "head:y")
    x, y = torch.randn(8, 3), torch.randn(8)
    batch = {PRIMARY_STREAM: (x, {"y": y})}
    params = list(model.parameters())
    direction = method.direction(compute_terms(model, batch, tasks), params)
    terms = compute_terms(model, batch, tasks)
    primary = torch.autograd.grad(terms.mean("y"), params)
    weight = {"backbone.layer1": 0.5, "backbone.layer2": 2.0, "heads": 0.0}
    for (name, p), d, gp in zip(model.named_parameters(), direction, primary):
        a = next(w for prefix, w in weight.items() if name.startswith(prefix))
        torch.testing.assert_close(d, gp + a * 2 * 0.05 * p.detach(), rtol=1e-6, atol=1e-7)


def test_batched_and_looped_per_loss_gradients_give_the_same_direction():
    tasks = REG_TASKS
    model = _regression_model()
    batch = {PRIMARY_STREAM: (torch.randn(10, 3), {t: torch.randn(10) for t in tasks.names})}
    out = []
    for batched in (True, False):
        method = MAOAL("parameter", init=0.7, batched=batched)
        method.setup(model, _info(tasks))
        out.append(method.direction(compute_terms(model, batch, tasks), list(model.parameters())))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- the hypergradient (Eq. 9 / A3)


class SharedLinear(nn.Module):
    """f(x) = x¹·θ¹ + x²·θ²: two modules, one output read by every task, so every loss is
    quadratic in θ and J = ∂g/∂θ is a constant (non-symmetric) matrix."""

    def __init__(self, d1: int, d2: int):
        super().__init__()
        self.d1 = d1
        self.block1 = nn.Linear(d1, 1, bias=False).to(DT)
        self.block2 = nn.Linear(d2, 1, bias=False).to(DT)

    def forward(self, x, tasks):
        out = self.block1(x[:, : self.d1]) + self.block2(x[:, self.d1 :])
        return out, {t: out for t in tasks}


class Quadratic:
    """Three regressions sharing one linear predictor; numpy float64 closed forms (no autograd).

    g(θ, α) = ∇L_y + Σ_i Σ_j α_ij P_j ∇L_ai with ∇L_k = H θ − (2/n) Xᵀ t_k, H = (2/n) XᵀX,
    P_j the 0/1 mask of module j. g is affine in θ: g = A(α) θ − b(α).
    """

    aux = ("a1", "a2")

    def __init__(self, seed: int = 0, n: int = 30, n_dev: int = 20, d1: int = 2, d2: int = 3):
        rng = np.random.default_rng(seed)
        d = d1 + d2
        self.d1, self.d2, self.n = d1, d2, n
        self.X = rng.standard_normal((n, d))
        w = rng.standard_normal(d)
        w1 = w.copy()
        w1[d1:] = rng.standard_normal(d2)  # a1 agrees with y on module 1 only
        self.t = {"y": self.X @ w + 0.3 * rng.standard_normal(n), "a1": self.X @ w1, "a2": self.X @ rng.standard_normal(d)}
        self.Xd = rng.standard_normal((n_dev, d))
        self.yd = self.Xd @ w + 0.3 * rng.standard_normal(n_dev)
        self.P = [np.r_[np.ones(d1), np.zeros(d2)], np.r_[np.zeros(d1), np.ones(d2)]]
        self.H = 2 / n * self.X.T @ self.X
        self.alpha = np.array([[0.7, 1.3], [0.4, 0.9]])
        self.eta = 0.5 / np.max(np.real(np.linalg.eigvals(self.A(self.alpha))))
        self.rng = rng

    def grad(self, theta, task):
        return 2 / self.n * self.X.T @ (self.X @ theta - self.t[task])

    def g(self, theta, alpha):
        return self.grad(theta, "y") + sum(
            alpha[i, j] * self.P[j] * self.grad(theta, a) for i, a in enumerate(self.aux) for j in range(2)
        )

    def D(self, alpha, i):
        return np.diag(sum(alpha[i, j] * self.P[j] for j in range(2)))

    def A(self, alpha):
        return self.H + sum(self.D(alpha, i) @ self.H for i in range(2))

    def best_response(self, alpha):
        b = 2 / self.n * (self.X.T @ self.t["y"] + sum(self.D(alpha, i) @ self.X.T @ self.t[a] for i, a in enumerate(self.aux)))
        return np.linalg.solve(self.A(alpha), b)

    def unroll(self, theta0, alpha, steps):
        path = [theta0]
        for _ in range(steps):
            path.append(path[-1] - self.eta * self.g(path[-1], alpha))
        return path

    def dev_loss(self, theta):
        return float(np.mean((self.Xd @ theta - self.yd) ** 2))

    def finite_differences(self, theta0, steps, eps=1e-6):
        """d/dα L_dev(θ_T(α)) with θ_T unrolled from θ0: central differences, float64."""
        h = np.zeros_like(self.alpha)
        for i in range(2):
            for j in range(2):
                up, down = self.alpha.copy(), self.alpha.copy()
                up[i, j] += eps
                down[i, j] -= eps
                h[i, j] = (self.dev_loss(self.unroll(theta0, up, steps)[-1]) - self.dev_loss(self.unroll(theta0, down, steps)[-1])) / (2 * eps)
        return h

    def maoal_hypergradient(self, theta, lookback):
        """MAOAL's hypergradient at θ through the real upper step (recorded, not applied)."""
        tasks = REG_TASKS
        model = SharedLinear(self.d1, self.d2)
        with torch.no_grad():
            model.block1.weight.copy_(torch.tensor(theta[: self.d1])[None])
            model.block2.weight.copy_(torch.tensor(theta[self.d1 :])[None])
        method = MAOAL(lambda m: custom(m, {"block1": m.block1, "block2": m.block2}), lookback=lookback,
                       hyper_lr=float(self.eta), clip=None, upper_optimizer=Recorder, init=self.alpha.tolist(),
                       upper_data="dev")  # the paper's upper objective: the dev loss
        method.setup(model, _info(tasks))
        t = lambda a: torch.tensor(a, dtype=DT)  # noqa: E731
        train = {PRIMARY_STREAM: (t(self.X), {k: t(v) for k, v in self.t.items()})}
        dev = {PRIMARY_STREAM: (t(self.Xd), {"y": t(self.yd)})}

        def terms(batch, names=None):  # float64 squared errors, built here so nothing is cast
            x, tgt = batch[PRIMARY_STREAM]
            names = names or tasks.names
            feats, outs = model(x, names)
            return LossTerms(tasks, {n: (outs[n][:, 0] - tgt[n]) ** 2 for n in names},
                             {n: torch.ones(len(x), dtype=torch.bool) for n in names}, outs, {PRIMARY_STREAM: feats},
                             {PRIMARY_STREAM: tgt})

        method.upper_step(model, _context(model, tasks, train, dev, float(self.eta), terms))
        return method.upper_opt.grads[-1][0].numpy()


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_hypergradient_equals_finite_differences_of_unrolled_dev_loss_at_the_best_response(steps):
    # Supplement A2: d/dα L_dev(θ_T) = −η Σ_{τ<T} vᵀ Π_{j<τ}(I − ηJ(θ_{T−1−j})) ∂g/∂α(θ_{T−1−τ}).
    # A3 (MAOAL's approximation) evaluates every J and ∂g/∂α at θ_T. When the lower run starts at
    # the best response θ*(α), θ_t = θ* for every t, so A3 with look-back M = T is exact: the
    # recorded hypergradient must equal finite differences of the T-step unroll to FD precision.
    # (With M = T + 1 summands, Algorithm 1's loop, it would not: this pins M ↔ terms = M − 1.)
    q = Quadratic()
    theta_star = q.best_response(q.alpha)
    assert np.abs(q.g(theta_star, q.alpha)).max() < 1e-12
    truth = q.finite_differences(theta_star, steps)
    ours = q.maoal_hypergradient(theta_star, lookback=steps)
    np.testing.assert_allclose(ours, truth, rtol=1e-6, atol=1e-8)
    assert np.abs(truth).max() > 1e-2  # a real signal, not zeros


def test_hypergradient_error_off_the_best_response_is_within_the_drift_bound_and_vanishes_with_it():
    # Off the best response A3 and A2 differ only through the θ at which ∂g/∂α is taken (J is
    # constant here): error_ij = −η Σ_τ u_τᵀ P_j H (θ_{M−1−τ} − θ_M) with u_τ = (I − ηJᵀ)^τ v,
    # v = ∇L_dev(θ_M). Cauchy–Schwarz gives the bound used:
    #     |error_ij| ≤ η Σ_{τ<M} ‖P_j u_τ‖ · ‖P_j H (θ_{M−1−τ} − θ_M)‖,
    # first order in the drift of θ over the look-back window, which is why the best-response
    # approximation is good near a fixed point. Checked at two distances from θ*.
    q = Quadratic()
    M = 3
    theta_star = q.best_response(q.alpha)
    offset = q.rng.standard_normal(theta_star.shape) * np.linalg.norm(theta_star) / np.sqrt(len(theta_star))
    J = q.A(q.alpha)
    errors = []
    for scale in (1.0, 0.1):
        theta0 = theta_star + scale * offset
        path = q.unroll(theta0, q.alpha, M)
        truth = q.finite_differences(theta0, M)
        ours = q.maoal_hypergradient(path[-1], lookback=M)
        v = 2 / len(q.yd) * q.Xd.T @ (q.Xd @ path[-1] - q.yd)
        bound, u = np.zeros_like(q.alpha), v
        for tau in range(M):
            w = q.H @ (path[M - 1 - tau] - path[-1])
            for j in range(2):
                bound[:, j] += q.eta * np.linalg.norm(q.P[j] * u) * np.linalg.norm(q.P[j] * w)
            u = u - q.eta * J.T @ u
        error = np.abs(ours - truth)
        assert (error <= bound + 1e-8).all(), (error, bound)
        assert error.max() > 1e-4  # off the best response the approximation is not exact
        errors.append(error.max())
    assert errors[1] < 0.25 * errors[0]  # a 10× smaller drift gives a much smaller error


# --------------------------------------------------------------------------- Model-L = a learned per-loss weighting


def test_model_partition_equals_learned_per_loss_weighting_in_direction_and_hypergradient():
    # Model-L: g = ∇L_goal + Σ_i α_i ∇L_ai, the gradient of L_goal + Σ_i w_i L_ai with w = α: AuxL's
    # linear net without the primary input, built as one scalar objective and one backward pass,
    # must give the same lower direction and the same hypergradient (an independent computation).
    tasks = TaskSet([
        Task("y", "classification", 3, primary=True),
        Task("a", "classification", 2),
        Task("b", "regression", stream="other"),
    ])
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (12,), generator=g)
    y[::4] = MISSING_CLASS  # scarce primary labels: means over labelled samples only
    train = {PRIMARY_STREAM: (torch.randn(12, 5, generator=g), {"y": y, "a": torch.randint(0, 2, (12,), generator=g), "index": torch.arange(12)}),
             "other": (torch.randn(7, 5, generator=g), {"b": torch.randn(7, generator=g), "index": torch.arange(7)})}
    dev = {PRIMARY_STREAM: (torch.randn(9, 5, generator=g), {"y": torch.randint(0, 3, (9,), generator=g)})}
    weights = [0.6, 1.8]
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(MLP(5, hidden=(6,)), tasks).to(DT)
    for batch in (train, dev):
        for stream, (x, t) in batch.items():
            batch[stream] = (x.to(DT), {k: v.to(DT) if v.is_floating_point() else v for k, v in t.items()})
    maoal = MAOAL("model", init=[[w] for w in weights], lookback=3, hyper_lr=0.05, clip=None, upper_optimizer=Recorder,
                  upper_data="dev")  # AuxL's upper objective is the dev loss too
    auxl = AuxL("linear", primary_in_net=False, skip=True, terms=2, hyper_lr=0.05, clip=None, upper_optimizer=Recorder)
    for method in (maoal, auxl):
        method.setup(model, _info(tasks))
    with torch.no_grad():
        auxl.combiner.layers[0].weight.copy_(torch.tensor([weights], dtype=DT))
    params = list(model.parameters())
    d_maoal = maoal.direction(compute_terms(model, train, tasks), params)
    d_auxl = auxl.direction(compute_terms(model, train, tasks), params)
    for a, b in zip(d_maoal, d_auxl):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for method in (maoal, auxl):
        method.upper_step(model, _context(model, tasks, train, dev, 0.05))
    h_maoal = maoal.upper_opt.grads[-1][0].reshape(-1)
    h_auxl = auxl.upper_opt.grads[-1][0].reshape(-1)
    torch.testing.assert_close(h_maoal, h_auxl, rtol=1e-9, atol=1e-12)
    assert h_maoal.abs().max() > 1e-4


# --------------------------------------------------------------------------- the module-level effect


def _mixed_run(seed: int, steps: int = 150):
    # SyntheticSource(aux="mixed"): the auxiliary label needs the same first-layer features as
    # the primary one (helps layer1) but the opposite comparison in layer2 (harms it).
    source = SyntheticSource(n=4000, dim=16, num_classes=4, aux="mixed", seed=seed)
    bundle = source.bundle(val_size=100, test_size=100, dev_size=80, label_fraction=0.05)
    torch.manual_seed(seed)
    model = MultiHeadModel.for_tasks(MLP(16, hidden=(16, 16)), bundle.tasks)
    method = MAOAL("block", lower_steps=1, upper_lr=5e-2, fallback=None)
    result = Trainer(model, method, bundle, steps=steps, batch_size=64, lr=1e-2, seed=seed, device="cpu",
                     progress=False, eval_every=steps // 3).fit()
    return method, result


def test_mixed_auxiliary_task_ends_more_important_to_layer1_than_to_layer2_over_seeds():
    for seed in range(3):
        method, result = _mixed_run(seed)
        last = result.trace[-1]
        assert last["importance_losses"] == ["aux"]
        assert last["importance_groups"] == ["layer1", "layer2", "head:label", "head:aux"]
        alpha = np.array(last["importance"])
        assert alpha[0, 0] > alpha[0, 1], (seed, alpha)
        # the trace holds α at every evaluation, never negative, flat keys agree with the matrix
        assert len(result.trace) == 3
        assert all(np.min(t["importance"]) >= 0 for t in result.trace)
        assert last["importance/aux/layer1"] == alpha[0, 0]
        # the aux loss never reaches the primary head: that pair is recorded as unreached
        assert last["importance_reach"][0] == [True, True, False, True]


def test_same_seed_gives_the_same_importance_history():
    runs = [_mixed_run(seed=5, steps=12)[1] for _ in range(2)]
    assert [t["importance"] for t in runs[0].trace] == [t["importance"] for t in runs[1].trace]
    assert runs[0].test_metric == runs[1].test_metric


# --------------------------------------------------------------------------- the upper step's side effects


def _image_problem():
    tasks = TaskSet([Task("digit", "classification", 10, primary=True), Task("rotation", "classification", 4, stream="rotation")])
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(ConvNet4(in_channels=1, channels=4, input_size=8), tasks)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g)
    t = {"digit": torch.randint(0, 10, (16,), generator=g), "index": torch.arange(16)}
    train = {PRIMARY_STREAM: (x, t), "rotation": RotationView()(x, t)}
    dev = {PRIMARY_STREAM: (torch.randn(8, 1, 8, 8, generator=g), {"digit": torch.randint(0, 10, (8,), generator=g)})}
    return tasks, model, train, dev


def test_upper_step_leaves_parameters_and_batchnorm_buffers_untouched():
    tasks, model, train, dev = _image_problem()
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in before)
    method = MAOAL("block", hyper_lr=0.1)
    method.setup(model, _info(tasks))
    alpha0 = method.alpha.detach().clone()
    for _ in range(2):
        method.upper_step(model, _context(model, tasks, train, dev, 0.1))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(method.alpha.detach(), alpha0)  # α did move


@pytest.mark.parametrize("nonneg", ["clamp", "softplus", "relu"])
def test_importance_is_never_negative_even_after_huge_upper_steps(nonneg):
    tasks, model, train, dev = _image_problem()
    method = MAOAL("parameter", nonneg=nonneg, upper_optimizer="sgd", upper_lr=1e4, upper_momentum=0.0, hyper_lr=0.1)
    method.setup(model, _info(tasks))
    torch.testing.assert_close(method.importance().detach(), torch.ones_like(method.alpha))  # α₀ = 1 in every mode
    for _ in range(3):
        method.upper_step(model, _context(model, tasks, train, dev, 0.1))
        assert (method.importance() >= 0).all()
    alpha = method.importance().detach()
    assert (alpha == 0).any() and (alpha > 1).any()  # the projection was exercised, not idle
    if nonneg == "clamp":
        assert (method.alpha >= 0).all()


# --------------------------------------------------------------------------- configuration and errors


def test_lookback_m_is_m_minus_one_neumann_terms_and_paper_configuration():
    assert MAOAL(lookback=3).terms == 2 and MAOAL(lookback=1).terms == 0
    paper = MAOAL.paper("beauty")
    assert (paper.lower_steps, paper.upper_optimizer, paper.upper_lr, paper.upper_momentum) == (20, "sgd", 0.1, 0.0)
    assert isinstance(get("maoal", partition="model"), MAOAL)
    assert get("maoal").config()["hyper_lr"] == "lower"


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="lookback"):
        MAOAL(lookback=0)
    with pytest.raises(ValueError, match="Unknown partition"):
        MAOAL("layers")
    with pytest.raises(ValueError, match="nonneg"):
        MAOAL(nonneg="abs")
    with pytest.raises(ValueError, match="init"):
        MAOAL(init=-1.0)
    tasks = REG_TASKS
    model = _regression_model()
    with pytest.raises(ValueError, match=r"\(K_aux, m\) = \(2, 4\)"):
        MAOAL(init=[[1.0, 1.0]]).setup(model, _info(tasks))
    only_primary = TaskSet([Task("y", "regression", primary=True)])
    with pytest.raises(ValueError, match="at least one auxiliary loss"):
        MAOAL().setup(MultiHeadModel(MLP(3, hidden=(4,)), {"y": make_head(4, 1)}), _info(only_primary))
    method = MAOAL(aux_losses={"bad": lambda m, t: torch.ones(2)})
    method.setup(model, _info(tasks))
    batch = {PRIMARY_STREAM: (torch.randn(4, 3), {t: torch.randn(4) for t in tasks.names})}
    with pytest.raises(ValueError, match="scalar"):
        method.direction(compute_terms(model, batch, tasks), list(model.parameters()))


# --------------------------------------------------------------------------- figures read the trace faithfully


def test_importance_heatmap_and_slider_show_alpha_of_the_chosen_step():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from auxnb import plot, widgets

    trace = [
        {"step": s, "importance": [[a, b, 1.0]], "importance_losses": ["aux"],
         "importance_groups": ["layer1", "layer2", "head:y"], "importance_reach": [[True, True, False]]}
        for s, a, b in [(10, 0.5, 1.5), (20, 0.25, 2.0), (30, 0.0, 3.0)]
    ]
    ax = plot.importance_heatmap(trace, step=25)  # the last evaluation at or before step 25
    shown = np.ma.masked_invalid(ax.collections[0].get_array()).compressed()
    assert shown.tolist() == [0.25, 2.0]  # the unreached pair (aux, head:y) is masked out
    assert "step 20" in ax.get_title()
    plt.close("all")
    ax = plot.importance_over_training(trace)
    assert np.allclose(ax.collections[0].get_array().reshape(2, 3), [[0.5, 0.25, 0.0], [1.5, 2.0, 3.0]])
    plt.close("all")
    slider = widgets.importance_slider(trace).children[0]
    assert list(slider.options) == [10, 20, 30] and slider.value == 30
    plt.close("all")


# ----------------------------------------------------------------------------- issue 22: regularisers
def _conv_bn_model(tasks):
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.LayerNorm(6))
    backbone.out_features = 6
    return MultiHeadModel(backbone, {"y": make_head(6, 3)})


def test_normalised_params_are_exactly_those_whose_scale_the_loss_ignores():
    """Independent truth: the loss at c·p equals the loss at p (c = 3) for the detected parameters
    and differs for every other one; conv1 (→ BatchNorm) qualifies, conv2 (→ ReLU → BatchNorm), the
    BatchNorm affine parameters, the Linear before a LayerNorm and the head do not; an eval-mode
    BatchNorm (running statistics) makes nothing scale-invariant."""
    from auxnb.methods.maoal import normalised_params

    torch.manual_seed(0)
    tasks = TaskSet([Task("y", "classification", 3, primary=True)])
    model = _conv_bn_model(tasks)
    with torch.no_grad():  # non-trivial affine parameters (a zero β is unchanged by scaling)
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.backbone[3].bias.uniform_(0.5, 1.0)  # conv2 → ReLU: the bias breaks the ReLU's homogeneity
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))

    def loss():
        return nn.functional.cross_entropy(model(x)[1]["y"], y)

    params = list(model.parameters())
    flags = normalised_params([loss()], params)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, f in zip(names, flags) if f] == ["backbone.0.weight", "backbone.0.bias"]
    base = float(loss().detach())
    for (name, p), flag in zip(model.named_parameters(), flags):
        with torch.no_grad():
            p.mul_(3.0)
        scaled = float(loss().detach())
        with torch.no_grad():
            p.div_(3.0)
        if flag:
            assert scaled == pytest.approx(base, rel=1e-5, abs=1e-6), name
        elif name != "backbone.0.bias":
            assert abs(scaled - base) > 1e-4, (name, scaled, base)
    model.eval()
    assert not any(normalised_params([loss()], params))


def test_tangent_direction_removes_only_the_regulariser_pull_on_normalised_weights():
    """With an L2 regulariser as the only auxiliary loss: on conv1 (→ BatchNorm) the direction is the
    primary gradient alone, whatever α (the L2 pull 2·c·α·p is radial there and the primary gradient
    is orthogonal to p); elsewhere it is the paper's gp + 2·c·α·p."""
    torch.manual_seed(1)
    tasks = TaskSet([Task("y", "classification", 3, primary=True)])
    model = _conv_bn_model(tasks)
    method = MAOAL("model", aux_losses={"l2": l2_penalty(scale=0.05)}, init=[[2.0]], fallback=None)
    method.setup(model, _info(tasks))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    batch = {PRIMARY_STREAM: (x, {"y": y})}
    params = list(model.parameters())
    direction = method.direction(compute_terms(model, batch, tasks), params)
    primary = torch.autograd.grad(compute_terms(model, batch, tasks).mean("y"), params)
    for (name, p), d, gp in zip(model.named_parameters(), direction, primary):
        if name.startswith("backbone.0."):
            assert float((gp * p).sum()) == pytest.approx(0.0, abs=1e-5)  # the primary gradient is tangent
            torch.testing.assert_close(d, gp, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(d, gp + 2.0 * 2 * 0.05 * p.detach(), rtol=1e-5, atol=1e-6)
    assert method.trace()["scale_invariant_groups"] == ["model"]
    paper = MAOAL("model", aux_losses={"l2": l2_penalty(scale=0.05)}, init=[[2.0]], fallback=None, scale_invariant="none")
    paper.setup(model, _info(tasks))
    d_paper = paper.direction(compute_terms(model, batch, tasks), params)
    torch.testing.assert_close(d_paper[0], primary[0] + 2.0 * 2 * 0.05 * params[0].detach(), rtol=1e-5, atol=1e-6)


def test_a_regulariser_starts_off_and_the_paper_preset_starts_it_at_one():
    tasks = TaskSet([Task("y", "regression", primary=True), Task("a", "regression")])
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(MLP(3, hidden=(4,)), tasks)
    method = MAOAL(aux_losses={"l2": l2_penalty(scale=0.1)}, fallback=None)
    method.setup(model, _info(tasks))
    alpha = method.importance().detach()
    assert method.loss_names == ["a", "l2"]
    assert torch.equal(alpha[0], torch.ones(3)) and torch.equal(alpha[1], torch.zeros(3))
    # a task declared a regulariser (the rating settings' L2 task) is one too
    reg_tasks = TaskSet([Task("y", "regression", primary=True), Task("l2", "regression", extra={"regulariser": "‖θ‖²"})])
    m2 = MAOAL(fallback=None)
    m2.setup(MultiHeadModel.for_tasks(MLP(3, hidden=(4,)), reg_tasks), _info(reg_tasks))
    assert torch.equal(m2.importance().detach(), torch.zeros(1, 3))
    m3 = MAOAL(fallback=None, importance_param="log")
    m3.setup(MultiHeadModel.for_tasks(MLP(3, hidden=(4,)), reg_tasks), _info(reg_tasks))
    assert torch.allclose(m3.importance().detach(), torch.full((1, 3), 0.01))
    paper = MAOAL.paper(aux_losses={"l2": l2_penalty(scale=0.1)})
    paper.setup(model, _info(tasks))
    assert torch.equal(paper.importance().detach(), torch.ones(2, 3))
    with pytest.raises(ValueError, match="regulariser_init=0 needs α that can start at 0"):
        MAOAL(importance_param="log", regulariser_init=0.0)
    with pytest.raises(ValueError, match="regulariser_init must be"):
        MAOAL(regulariser_init=-1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_maoal_alone_does_no_harm_with_a_strong_l2_task_on_movielens_fixture_ratings(seed):
    """movielens100k-l2 (AutoInt, no normalisation layer) on fixture ratings, L2 coefficient 1 (the
    `small` scale's): MAOAL alone (no guard) must end within 0.02 RMSE of STL, with α of the L2
    task below 0.5 on every module; the paper's start (α = 1 for the regulariser) is the harm this
    guards against: > 1 RMSE worse than STL on the same seed (measured: 3.67 / 3.57 vs 1.70 / 1.66)."""
    import auxnb.experiments as E
    from auxnb.data.fixtures import fixture_root

    root = fixture_root("movielens-100k", n_users=120, n_items=80, per_user=20)
    kw = dict(scale="small", data_root=root, seed=seed, device="cpu", progress=False, epochs=3, batch_size=64, dev_size=50)
    stl = E.run("movielens100k-l2", "stl", **kw).test_metric
    run = E.run("movielens100k-l2", MAOAL(fallback=None), **kw)
    alpha = {k: v for k, v in run.trace[-1].items() if k.startswith("importance/l2/")}
    assert len(alpha) == 6 and max(alpha.values()) < 0.5, alpha
    assert run.test_metric <= stl + 0.02, (run.test_metric, stl)
    paper_start = E.run("movielens100k-l2", MAOAL(fallback=None, regulariser_init=None), **kw).test_metric
    assert paper_start > stl + 1.0
