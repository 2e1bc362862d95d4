"""AuxL (Navon et al. 2021) against independent truth: the combined loss by hand (masks, views
aligned by sample id, independent streams), monotonicity of the projected network, the
hypergradient against finite differences of a closed-form best response, and the upper step's
side effects (weights clamped, model untouched)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from auxnb.data import RotationView, SyntheticSource
from auxnb.methods import AuxL, get, l2_penalty
from auxnb.methods.auxl import MonotoneCombiner, loss_matrix
from auxnb.methods.base import LossTerms, SetupInfo, compute_terms
from auxnb.models import MLP, ConvNet4, MultiHeadModel
from auxnb.tasks import MISSING_CLASS, PRIMARY_STREAM, Task, TaskSet
from auxnb.train import Trainer, UpperContext

from helpers import Recorder, setup_info

DT = torch.float64


_info = setup_info


def _context(model, tasks, train, dev, lr, terms=None):
    terms = terms or (lambda b, **kw: compute_terms(model, b, tasks, **kw))
    return UpperContext(params=tuple(model.parameters()), tasks=tasks, train_batch=lambda: train,
                        dev_batch=lambda: dev, lr=lr, step=0, terms=terms)


# --------------------------------------------------------------------------- the combined loss by hand


def _hand_terms():
    """Per-sample losses given directly: primary on 4 images (one unlabelled), a rotation-like
    view of the same 4 images (8 rows, ids repeated, primary label carried), and an independent
    stream of 3 samples with ids that collide with the primary ids but carry no primary label."""
    tasks = TaskSet([
        Task("y", "classification", 3, primary=True),
        Task("rot", "classification", 4, stream="rot"),
        Task("other", "regression", stream="ext"),
    ])
    idx = torch.tensor([10, 11, 12, 13])
    y = torch.tensor([0, MISSING_CLASS, 2, 1])
    losses = {
        "y": torch.tensor([1.0, 0.0, 3.0, 5.0]),
        "rot": torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]),  # ids 10..13 then 10..13 again
        "other": torch.tensor([6.0, 9.0, 12.0]),
    }
    masks = {"y": y != MISSING_CLASS, "rot": torch.ones(8, dtype=torch.bool), "other": torch.ones(3, dtype=torch.bool)}
    targets = {PRIMARY_STREAM: {"y": y, "index": idx}, "rot": {"y": y.repeat(2), "rot": torch.arange(8) % 4, "index": idx.repeat(2)},
               "ext": {"other": torch.zeros(3), "index": torch.tensor([10, 11, 12])}}
    index = {k: v["index"] for k, v in targets.items()}
    return LossTerms(tasks, losses, masks, {}, {}, targets, index), tasks


def test_loss_matrix_by_hand_masks_views_and_independent_streams():
    terms, _ = _hand_terms()
    m = loss_matrix(terms, ["y", "rot", "other", "l2"], extra={"l2": torch.tensor(0.25)})
    # primary: 3 labelled of 4 → each loss × 4/3 (so the column mean is the labelled mean 3.0)
    assert m[:, 0].tolist() == pytest.approx([4 / 3, 0.0, 4.0, 20 / 3])
    # view aligned by id: image 10 has rows 0.5 and 2.5, ...; × B/n = 4/8
    assert m[:, 1].tolist() == pytest.approx([1.5, 2.0, 2.5, 3.0])
    # independent stream (no primary label in its targets): its batch mean on every row
    assert m[:, 2].tolist() == pytest.approx([9.0] * 4)
    assert m[:, 3].tolist() == pytest.approx([0.25] * 4)
    assert m.mean(0).tolist() == pytest.approx([3.0, 2.25, 9.0, 0.25])


def test_linear_objective_equals_skip_plus_weighted_sum_of_task_means():
    terms, tasks = _hand_terms()
    method = AuxL("linear", skip=True, primary_in_net=True, init=1.0)
    method.setup(nn.Linear(1, 1), _info(tasks))
    with torch.no_grad():
        method.combiner.layers[0].weight.copy_(torch.tensor([[0.5, 2.0, 0.1]]))
    # L = L_y + 0.5·L_y + 2·L_rot + 0.1·L_other with the labelled means 3, 2.25, 9
    assert float(method.objective(terms).detach()) == pytest.approx(3.0 + 0.5 * 3.0 + 2.0 * 2.25 + 0.1 * 9.0)
    weights = method.effective_weights()
    assert weights == pytest.approx({"y": 1.5, "rot": 2.0, "other": 0.1})


# --------------------------------------------------------------------------- monotonicity


def test_projected_nonlinear_net_is_monotone_in_every_loss():
    g = torch.Generator().manual_seed(0)
    net = MonotoneCombiner(3, "nonlinear", hidden=(10, 10), init_upper=0.2, generator=g).to(DT)
    with torch.no_grad():  # an upper step may push weights below 0 ...
        for layer in net.layers:
            layer.weight.normal_(generator=g)
            if layer.bias is not None:
                layer.bias.normal_(generator=g)
    points = torch.rand(200, 3, generator=g, dtype=DT) * 5
    points.requires_grad_(True)
    (slopes,) = torch.autograd.grad(net(points).sum(), points)
    assert (slopes < 0).any()  # ... and then the net is not monotone
    net.clamp_()  # ... until projected
    assert all((layer.weight >= 0).all() for layer in net.layers)
    (slopes,) = torch.autograd.grad(net(points).sum(), points)
    assert (slopes >= 0).all()
    base = net(points.detach())
    for k in range(3):
        bumped = points.detach().clone()
        bumped[:, k] += torch.rand(200, generator=g, dtype=DT)
        assert (net(bumped) >= base - 1e-12).all()


# --------------------------------------------------------------------------- the hypergradient


class SharedLinear(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Linear(d, 1, bias=False).to(DT)

    def forward(self, x, tasks):
        out = self.w(x)
        return out, {t: out for t in tasks}


@pytest.mark.parametrize("solver", ["exact", "neumann"])
def test_linear_hypergradient_matches_finite_differences_of_the_closed_form_best_response(solver):
    # Lower objective (1 + w0)·L_y + w1·L_a (skip + primary in the net), squared errors of one
    # shared linear predictor: θ*(w) solves ((1+w0+w1) H) θ = (2/n) Xᵀ((1+w0) y + w1 a). The
    # dev loss at θ*(w), differentiated by central differences, is the truth; AuxL's upper step
    # at θ*(w) must match it: exactly with the dense solve, and with a long Neumann series.
    rng = np.random.default_rng(0)
    n, nd, d = 40, 25, 4
    X, Xd = rng.standard_normal((n, d)), rng.standard_normal((nd, d))
    w_true = rng.standard_normal(d)
    y, a = X @ w_true + 0.5 * rng.standard_normal(n), X @ (w_true + rng.standard_normal(d))
    yd = Xd @ w_true + 0.5 * rng.standard_normal(nd)
    H = 2 / n * X.T @ X
    weights = np.array([0.3, 0.8])

    def best(wts):
        return np.linalg.solve((1 + wts.sum()) * H, 2 / n * X.T @ ((1 + wts[0]) * y + wts[1] * a))

    def dev(wts):
        return float(np.mean((Xd @ best(wts) - yd) ** 2))

    eps = 1e-6
    truth = np.array([(dev(weights + eps * e) - dev(weights - eps * e)) / (2 * eps) for e in np.eye(2)])
    tasks = TaskSet([Task("y", "regression", primary=True), Task("a", "regression")])
    model = SharedLinear(d)
    with torch.no_grad():
        model.w.weight.copy_(torch.tensor(best(weights))[None])
    lam = (1 + weights.sum()) * np.linalg.eigvalsh(H).max()
    method = AuxL("linear", hypergrad=solver, terms=400, hyper_lr=float(1 / lam), clip=None, upper_optimizer=Recorder)
    method.setup(model, _info(tasks))
    with torch.no_grad():
        method.combiner.layers[0].weight.copy_(torch.from_numpy(weights)[None])
    t = lambda v: torch.tensor(v, dtype=DT)  # noqa: E731
    train = {PRIMARY_STREAM: (t(X), {"y": t(y), "a": t(a), "index": torch.arange(n)})}
    devb = {PRIMARY_STREAM: (t(Xd), {"y": t(yd), "index": torch.arange(nd)})}
    method.upper_step(model, _context(model, tasks, train, devb, float(1 / lam)))
    ours = method.upper_opt.grads[-1][0].reshape(-1).numpy()
    np.testing.assert_allclose(ours, truth, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- the upper step's side effects


def test_upper_step_clamps_weights_and_leaves_model_and_batchnorm_untouched():
    tasks = TaskSet([Task("digit", "classification", 10, primary=True), Task("rotation", "classification", 4, stream="rotation")])
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(ConvNet4(in_channels=1, channels=4, input_size=8), tasks)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g)
    t = {"digit": torch.randint(0, 10, (16,), generator=g), "index": torch.arange(16)}
    train = {PRIMARY_STREAM: (x, t), "rotation": RotationView()(x, t)}
    dev = {PRIMARY_STREAM: (torch.randn(8, 1, 8, 8, generator=g), {"digit": torch.randint(0, 10, (8,), generator=g)})}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    method = AuxL("nonlinear", upper_optimizer="sgd", upper_lr=1e4, upper_momentum=0.0, hyper_lr=0.1)
    method.setup(model, _info(tasks))
    start = [p.detach().clone() for p in method.hparams()]
    for _ in range(3):
        method.upper_step(model, _context(model, tasks, train, dev, 0.1))
        assert all((layer.weight >= 0).all() for layer in method.combiner.layers)
    assert any((layer.weight == 0).any() for layer in method.combiner.layers)  # the projection acted
    assert any(not torch.equal(p, s) for p, s in zip(method.hparams(), start))
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(p.grad is None for p in model.parameters())


def test_training_run_is_deterministic_and_weights_stay_non_negative():
    bundle = SyntheticSource(n=600, aux="helpful", seed=0).bundle(val_size=100, test_size=100, dev_size=20, label_fraction=0.2)

    def fit():
        torch.manual_seed(0)
        model = MultiHeadModel.for_tasks(MLP(16, hidden=(16,)), bundle.tasks)
        method = AuxL("nonlinear", lower_steps=2, upper_lr=0.1, aux_losses={"l2": l2_penalty("backbone", scale=1e-3)})
        return Trainer(model, method, bundle, steps=12, batch_size=32, lr=1e-2, seed=0, device="cpu",
                       progress=False, eval_every=4).fit()

    a, b = fit(), fit()
    assert a.trace == b.trace and a.test_metric == b.test_metric
    assert set(a.trace[-1]) >= {"weight/label", "weight/aux", "weight/l2", "upper/dev_loss"}
    for row in a.trace:
        assert row["weight/aux"] >= 0 and row["weight/l2"] >= 0 and row["weight/label"] >= 1  # skip adds 1


def test_registry_and_bad_configurations():
    assert isinstance(get("auxl", kind="linear"), AuxL)
    assert get("auxl").config()["kind"] == "nonlinear"
    with pytest.raises(ValueError, match="kind"):
        AuxL("quadratic")
    with pytest.raises(ValueError, match="primary loss would not be trained"):
        AuxL(skip=False, primary_in_net=False)
    with pytest.raises(ValueError, match="non-negative"):
        AuxL(init=-1.0)
