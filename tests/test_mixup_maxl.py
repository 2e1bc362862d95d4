"""MixUp family and MAXL (auxnb.methods.mixup, auxnb.methods.maxl) against independent truth: mixed
batches and losses by hand, Beta moments, the masked softmax by hand and at extreme logits, MAXL's
entropy term, the look-ahead it replaces, and Auto-F-Mix's hypergradient against finite differences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxnb.data import SyntheticSource, TaskDataset, build_bundle
from auxnb.hypergrad import implicit_grad
from auxnb.methods import MAXL, AutoFMix, AutoMix, FMixUp, MixUp, SetupInfo, get
from auxnb.methods.base import compute_terms
from auxnb.methods.maxl import hierarchical_masked_softmax, hierarchy_mask
from auxnb.methods.mixup import mix, mixed_loss
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import MISSING_CLASS, PRIMARY_STREAM, Task, TaskSet
from auxnb.train import Trainer

DT = torch.float64


def _info(tasks, seed=0):
    return SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=10, seed=seed, generator=torch.Generator().manual_seed(1))


class Recorder(nn.Module):
    """An identity backbone that remembers the inputs it was called with."""

    def __init__(self, d):
        super().__init__()
        self.out_features = d
        self.seen: list[torch.Tensor] = []

    def blocks(self):
        return []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x


def _batch(n=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.tensor([0, 1, 2, 1][:n])
    return {PRIMARY_STREAM: (x, {"digit": y, "aux": torch.tensor([1, 0, 1, 1][:n]), "index": torch.arange(n)})}


TASKS = TaskSet([Task("digit", "classification", 3, primary=True), Task("aux", "classification", 2)])


def _hand_soft_ce(logits, target):
    out = []
    for row, t in zip(logits.tolist(), target.tolist()):
        z = math.log(sum(math.exp(v) for v in row))
        out.append(-sum(ti * (v - z) for ti, v in zip(t, row)))
    return sum(out) / len(out)


@pytest.mark.parametrize("space", ["input", "feature"])
def test_mixed_batch_is_lambda_xi_plus_one_minus_lambda_xj_with_mixed_labels(space):
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(Recorder(3), TASKS)
    batch = _batch()
    terms = compute_terms(model, batch, TASKS)
    x, y = batch[PRIMARY_STREAM][0], batch[PRIMARY_STREAM][1]["digit"]
    perm, lam = torch.tensor([3, 2, 0, 1]), 0.3
    model.backbone.seen.clear()
    loss = mixed_loss(model, terms, TASKS.primary, perm, lam, space)
    by_hand = torch.stack([lam * x[i] + (1 - lam) * x[perm[i]] for i in range(4)])
    if space == "input":  # the model saw exactly the mixed inputs
        assert len(model.backbone.seen) == 1 and torch.allclose(model.backbone.seen[0], by_hand, atol=1e-6)
    else:  # feature space: no new forward pass; the identity backbone makes features = inputs
        assert model.backbone.seen == []
    w, b = model.heads["digit"].weight.detach(), model.heads["digit"].bias.detach()
    target = torch.stack([lam * F.one_hot(y[i], 3) + (1 - lam) * F.one_hot(y[perm[i]], 3) for i in range(4)]).float()
    assert loss.item() == pytest.approx(_hand_soft_ce(by_hand @ w.T + b, target), rel=1e-5)


def test_mix_with_one_lambda_per_sample():
    a, b = torch.ones(2, 2), torch.zeros(2, 2)
    assert mix(a, b, torch.tensor([0.25, 1.0])).tolist() == [[0.25, 0.25], [1.0, 1.0]]


def test_mixup_lambda_draws_have_the_beta_moments():
    m = MixUp(alpha=0.4, per_sample=True)
    m.setup(nn.Linear(1, 1), _info(TASKS))
    _, lam = m.draw(20000)
    # Beta(a, a): mean 1/2, variance 1/(4(2a + 1))
    assert float(lam.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(lam.var()) == pytest.approx(1 / (4 * 1.8), rel=0.05)
    assert float(lam.min()) >= 0 and float(lam.max()) <= 1


def test_mixup_objective_is_primary_plus_aux_plus_weighted_mixed_loss():
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(Recorder(3), TASKS)
    m = FMixUp(weight=0.7, aux_weight=0.4)
    m.setup(model, _info(TASKS))
    perm, lam = torch.tensor([1, 0, 3, 2]), torch.tensor(0.6)
    m.draw = lambda b: (perm, lam)
    terms = compute_terms(model, _batch(), TASKS)
    expected = terms.mean("digit") + 0.4 * terms.mean("aux") + 0.7 * mixed_loss(model, terms, TASKS.primary, perm, 0.6, "feature")
    assert m.objective(terms).item() == pytest.approx(expected.item(), rel=1e-6)
    assert m.trace()["lambda"] == pytest.approx(0.6)


def test_auto_mix_projects_weights_to_nonnegative_and_keeps_lambda_in_unit_interval():
    m = AutoMix(init_lam=0.9)
    m.setup(MultiHeadModel.for_tasks(Recorder(3), TASKS), _info(TASKS))
    assert float(m.lam.detach()) == pytest.approx(0.9)
    with torch.no_grad():
        m.task_weights.copy_(torch.tensor([-0.5, 2.0]))
        m.project()
    assert m.task_weights.tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="init_lam"):
        AutoMix(init_lam=1.0)


class LinearTrunk(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.layer = nn.Linear(d_in, d_out, bias=False)
        self.out_features = d_out

    def blocks(self):
        return [("layer", self.layer)]

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("theta_of", ["head", "backbone"])
def test_auto_f_mix_hypergradient_matches_finite_differences(theta_of):
    # regression primary with linear heads; θ = the primary head, or the (linear) backbone with the
    # heads fixed, so that the mixed features depend on θ. Either way the lower objective is
    # quadratic in θ, one Newton step solves it exactly and the implicit gradient must equal the
    # derivative of the dev loss. (A one-dimensional feature keeps J non-singular for the backbone.)
    tasks = TaskSet([Task("y", "regression", primary=True), Task("aux", "regression")])
    torch.manual_seed(0)
    width = 3 if theta_of == "head" else 1
    model = MultiHeadModel.for_tasks(LinearTrunk(4, width), tasks).to(DT)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("heads.y" if theta_of == "head" else "backbone"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.backbone.layer.weight.copy_(0.6 * torch.randn(width, 4, generator=g, dtype=DT))
    train = {PRIMARY_STREAM: (torch.randn(12, 4, generator=g, dtype=DT),
                              {"y": torch.randn(12, generator=g, dtype=DT), "aux": torch.randn(12, generator=g, dtype=DT)})}
    dev = {PRIMARY_STREAM: (torch.randn(9, 4, generator=g, dtype=DT), {"y": torch.randn(9, generator=g, dtype=DT)})}
    m = AutoFMix(init_lam=0.7)
    m.setup(model, _info(tasks))
    perm = torch.randperm(12, generator=g)
    m.permutation = lambda b: perm  # a fixed pairing for the whole test
    theta = [p for p in model.parameters() if p.requires_grad]
    phi = m.hparams()
    with torch.no_grad():
        m.task_weights.copy_(torch.tensor([0.5, 1.5], dtype=DT))

    def direction(create_graph):
        return m.direction(compute_terms(model, train, tasks), theta, create_graph=create_graph)

    def solve():
        grads = direction(True)
        flat = torch.cat([t.reshape(-1) for t in grads])
        jac = torch.stack([torch.cat([r.reshape(-1) for r in torch.autograd.grad(flat[i], theta, retain_graph=True)]) for i in range(len(flat))])
        step = torch.linalg.solve(jac, flat.detach())
        with torch.no_grad():
            off = 0
            for p in theta:
                p.sub_(step[off:off + p.numel()].reshape(p.shape))
                off += p.numel()

    solve()
    inner = direction(True)
    outer = compute_terms(model, dev, tasks, names=["y"]).mean("y")
    hyper = implicit_grad(outer, inner, theta, phi, method="exact")
    state, theta0 = [p.detach().clone() for p in phi], [p.detach().clone() for p in theta]
    eps = 1e-5
    for which, index in ((0, ()), (1, (0,)), (1, (1,))):  # λ, w_aux, w_mix
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, s in zip(phi, state):
                    p.copy_(s)
                phi[which][index] += sign * eps
                for p, t0 in zip(theta, theta0):
                    p.copy_(t0)
            solve()
            with torch.no_grad():
                values.append(float(compute_terms(model, dev, tasks, names=["y"]).mean("y")))
        fd = (values[0] - values[1]) / (2 * eps)
        assert float(hyper[which][index]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


# --------------------------------------------------------------------------- MAXL


def test_hierarchical_masked_softmax_equals_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    labels = torch.tensor([1, 0])
    psi = [2, 3]  # class 0 owns aux classes 0-1, class 1 owns 2-4
    out = hierarchical_masked_softmax(logits, labels, psi)
    z = math.exp(0.5) + math.exp(-1.0) + math.exp(3.0)
    assert out[0].tolist() == pytest.approx([0, 0, math.exp(0.5) / z, math.exp(-1.0) / z, math.exp(3.0) / z], rel=1e-6)
    z = math.exp(0.0) + math.exp(1.0)
    assert out[1].tolist() == pytest.approx([1 / z, math.e / z, 0, 0, 0], rel=1e-6)
    assert hierarchy_mask(psi).sum(1).tolist() == psi


def test_hierarchical_masked_softmax_is_stable_for_huge_logits_and_zero_for_missing_labels():
    logits = torch.tensor([[1e4, 1e4 - 1.0, -1e4, 5.0], [-1e4, -1e4 + 2.0, 0.0, 0.0], [3.0, 1.0, 2.0, 0.0]])
    out = hierarchical_masked_softmax(logits, torch.tensor([0, 0, MISSING_CLASS]), [2, 2])
    assert torch.isfinite(out).all()
    e = math.exp(-1.0)
    assert out[0].tolist() == pytest.approx([1 / (1 + e), e / (1 + e), 0, 0], rel=1e-6)
    e = math.exp(2.0)
    assert out[1].tolist() == pytest.approx([1 / (1 + e), e / (1 + e), 0, 0], rel=1e-6)
    assert out[2].tolist() == [0.0, 0.0, 0.0, 0.0]
    # the authors' exp(z)·mask / Σ form overflows here
    naive = torch.exp(logits[0]) * torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert not torch.isfinite(naive / naive.sum()).all()
    # and gradients stay finite
    z = logits.clone().requires_grad_(True)
    hierarchical_masked_softmax(z, torch.tensor([0, 1, 1]), [2, 2])[:, 1].sum().backward()
    assert torch.isfinite(z.grad).all()


def _maxl_terms(seed=0):
    tasks = TaskSet([Task("digit", "classification", 3, primary=True)])
    torch.manual_seed(seed)
    model = MultiHeadModel.for_tasks(MLP(5, hidden=(6,)), tasks)
    g = torch.Generator().manual_seed(seed)
    batch = {PRIMARY_STREAM: (torch.randn(8, 5, generator=g), {"digit": torch.randint(0, 3, (8,), generator=g)})}
    return tasks, model, batch


def test_maxl_entropy_regulariser_is_weighted_sum_of_mean_times_log_mean():
    tasks, model, batch = _maxl_terms()
    m = MAXL(psi=2, entropy_weight=0.2, generator="features")
    m.setup(model, _info(tasks))
    terms = compute_terms(model, batch, tasks)
    p = m.generated_labels(terms).detach()
    mean = p.mean(0).tolist()
    assert m.regulariser(terms).item() == pytest.approx(0.2 * sum(v * math.log(v) for v in mean if v > 0), rel=1e-5)
    # every generated label lives on its own class's ψ = 2 auxiliary classes
    y = batch[PRIMARY_STREAM][1]["digit"]
    assert torch.allclose(p.sum(1), torch.ones(8)) and bool((p * ~hierarchy_mask([2] * 3)[y]).eq(0).all())


def test_maxl_first_order_upper_gradient_approximates_the_one_step_lookahead():
    # MAXL differentiates L_p(θ − α g(θ, φ)) in φ. With terms=0 and η = α the shared implicit
    # gradient is −α ∇θL_p(θ)ᵀ ∂g/∂φ: the same up to reading ∇θL_p at θ instead of θ − α g,
    # a relative difference O(α·‖∇²L_p‖), so ten times smaller α must give a ten times smaller gap.
    tasks, model, batch = _maxl_terms(1)
    model = model.to(DT)
    batch = {PRIMARY_STREAM: (batch[PRIMARY_STREAM][0].to(DT), batch[PRIMARY_STREAM][1])}
    m = MAXL(psi=2, generator="features")
    m.setup(model, _info(tasks))
    m.label_net.to(DT)
    m.aux_head.to(DT)
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    phi = m.hparams()
    errors = []
    for alpha in (1e-2, 1e-3):
        terms = compute_terms(model, batch, tasks)
        g = m.direction(terms, params, create_graph=True)
        outer = compute_terms(model, batch, tasks, names=["digit"]).mean("digit")
        first = implicit_grad(outer, g, params, phi, method="neumann", terms=0, lr=alpha, retain_graph=True)
        fast = {n: p - alpha * gi for n, p, gi in zip(names, params, g)}
        _, out = torch.func.functional_call(model, fast, (batch[PRIMARY_STREAM][0], ["digit"]))
        look = F.cross_entropy(out["digit"], batch[PRIMARY_STREAM][1]["digit"])
        unrolled = torch.autograd.grad(look, phi, allow_unused=True)
        a = torch.cat([t.reshape(-1) for t in first])
        b = torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(unrolled, phi)])
        errors.append(float((a - b).norm() / b.norm()))
    assert errors[1] < 2e-3 and 5 < errors[0] / errors[1] < 20  # 0.63 % at 1e-2, 0.063 % at 1e-3: O(α)


def test_maxl_needs_a_classification_primary_task():
    tasks = TaskSet([Task("rating", "regression", primary=True)])
    with pytest.raises(ValueError, match="classification"):
        MAXL().setup(MultiHeadModel.for_tasks(MLP(2, hidden=(2,)), tasks), _info(tasks))


def _tiny_fit(method, steps=8):
    src = SyntheticSource(n=160, dim=6, num_classes=3, aux="helpful", noise=0.3, seed=0)
    x, y, aux = src.tensors()
    tasks = TaskSet([Task("label", "classification", 3, primary=True), Task("aux", "classification", 6)])
    bundle = build_bundle(TaskDataset(x, {"label": y, "aux": aux}), tasks, val_size=30, test_size=30, dev_size=20, seed=0)
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)
    return Trainer(model, method, bundle, steps=steps, batch_size=16, eval_every=steps, progress=False, device="cpu", seed=2).fit()


@pytest.mark.parametrize("name", ["mixup", "f-mixup", "auto-mix", "auto-f-mix", "maxl"])
def test_same_seed_gives_the_same_run(name):
    kwargs = {"lower_steps": 2} if name in ("auto-mix", "auto-f-mix") else {}
    a, b = _tiny_fit(get(name, **kwargs)), _tiny_fit(get(name, **kwargs))
    assert a.val_metric == b.val_metric
    keys = [k for k, v in a.trace[-1].items() if isinstance(v, float)]
    assert keys and all(a.trace[-1][k] == b.trace[-1][k] or (math.isnan(a.trace[-1][k]) and math.isnan(b.trace[-1][k])) for k in keys)


def test_maxl_trains_its_own_auxiliary_head_and_its_generator():
    m = MAXL(generator="features")
    start = {}
    real_setup = m.setup

    def setup(model, info):  # the head and generator as the run's own set-up made them
        real_setup(model, info)
        start["head"] = [p.detach().clone() for p in m.lower_parameters()]
        start["generator"] = [p.detach().clone() for p in m.hparams()]

    m.setup = setup
    r = _tiny_fit(m, steps=6)
    head0 = nn.Linear(8, 15)
    assert m.lower_parameters()[0].shape == head0.weight.shape
    assert r.config["data"]["dev"] == 0  # the upper objective reads the training data (MAXL)
    assert r.trace[-1]["upper/hypergrad_norm"] > 0
    # the lower optimiser moved the auxiliary head and the upper steps moved the label generator
    assert all(not torch.equal(a, b) for a, b in zip(start["head"], m.lower_parameters()))
    changed = [not torch.equal(a, b) for a, b in zip(start["generator"], m.hparams())]
    assert sum(changed) >= len(changed) // 2 and changed[-1]  # the classifier layer among them
