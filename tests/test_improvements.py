"""The issue-8 switches of the bi-level methods, against independent truth.

- ``refit``: which lower step reads which split (sample ids), how many upper steps run, φ frozen
  after the refit step, exact resume across it;
- ``hyper_lr="auto"``: η = target / λ_max(J) with J in closed form (a linear model with squared
  loss: J = 2·ZᵀZ/n), re-estimated on the stated cadence;
- ``dev_batches``: the upper objective is the mean of the dev batches' mean losses (by hand);
- ``upper_data="train"``: no D_dev at all, the upper objective is a second training batch;
- JTDS ``normalize="softmax"``: the weights by hand, their sums, masks and finite gradients;
- JTDS with a normalisation pins the primary task's weight at 1 (task factor σ1(α_k)/σ1(α_primary));
- ``compute_terms(freeze_aux_buffers=True)`` on a BatchNorm model: running statistics, batch
  statistics and a backward pass through both streams, against a manual computation.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxnb.data import DataBundle, SyntheticSource, TaskDataset, build_bundle
from auxnb.hypergrad import implicit_grad
from auxnb.methods import JTDS, MAOAL
from auxnb.methods.base import LossTerms, SetupInfo, compute_terms
from auxnb.methods.bilevel import BilevelMethod
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import INDEX_KEY, PRIMARY_STREAM, Task, TaskSet
from auxnb.train import Trainer, UpperContext

from helpers import Recorder

DT = torch.float64
PRIMARY = "label"


# =========================================================================== shared pieces


def class_tasks() -> TaskSet:
    return TaskSet([Task(PRIMARY, "classification", 3, primary=True), Task("aux", "classification", 6)])


def class_data(seed: int = 0) -> DataBundle:
    """240 samples: train 136, dev 24, val 40, test 40 (train ∪ dev = 160 = 10 batches of 16)."""
    src = SyntheticSource(n=240, dim=6, num_classes=3, aux="helpful", noise=0.3, seed=seed)
    x, y, aux = src.tensors()
    source = TaskDataset(x.to(DT), {PRIMARY: y, "aux": aux})
    data = build_bundle(source, class_tasks(), val_size=40, test_size=40, dev_size=24, seed=seed)
    assert (len(data.train), len(data.dev), len(data.val), len(data.test)) == (136, 24, 40, 40)
    return data


def class_model(seed: int = 0) -> MultiHeadModel:
    torch.manual_seed(seed)
    return MultiHeadModel.for_tasks(MLP(6, hidden=(8, 8)), class_tasks()).to(DT)


def ids_of(split: TaskDataset) -> set[int]:
    return set(split.index.tolist())


class RecordingMixin:
    """Records the primary sample ids of every lower batch, upper train batch and upper dev batch."""

    def setup(self, model, info):
        super().setup(model, info)
        self.lower_ids: list[torch.Tensor] = []
        self.upper_train_ids: list[torch.Tensor] = []
        self.dev_ids: list[torch.Tensor] = []
        self.dev_calls: list[int] = []
        self.phi0 = [h.detach().clone() for h in self.hparams()]  # φ as set up, before any upper step

    def direction(self, terms, params, *, create_graph=False):
        (self.upper_train_ids if create_graph else self.lower_ids).append(terms.index[PRIMARY_STREAM].clone())
        return super().direction(terms, params, create_graph=create_graph)

    def upper_step(self, model, context):
        fetch = context.dev_batch
        calls = [0]

        def dev_batch():
            calls[0] += 1
            batch = fetch()
            self.dev_ids.append(batch[PRIMARY_STREAM][1][INDEX_KEY].clone())
            return batch

        out = super().upper_step(model, dataclasses.replace(context, dev_batch=dev_batch))
        self.dev_calls.append(calls[0])
        return out


#: the score and schedule these tests' hand formulas and step counts were written for: the raw feature and
#: no warm-up (the constructor's defaults before issue 22, `JTDS.issue8`); φ's optimiser is each test's own
# issue 8's constructor defaults (`JTDS.issue8` but with the constructor's upper level): the raw feature, no warm-up,
# the primary's α_G learned (pin_primary=False: the default before 2026-12-07) and the series started afresh at every
# upper step (warm_start=0: the default before methods_learn.md §21; warm, with this fast φ and α_G learned, the
# refit tests' run grew its curvature past 2/η by upper step 9)
ISSUE8 = {"feature_norm": "none", "warmup": 0, "pin_primary": False, "warm_start": 0.0}


class RecordingJTDS(RecordingMixin, JTDS):
    pass


def phi(method) -> list[torch.Tensor]:
    return [h.detach().clone() for h in method.hparams()]


def same_phi(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def same_trace(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b):
        if ra.keys() != rb.keys():
            return False
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
                if va is None or vb is None or not np.array_equal(np.asarray(va), np.asarray(vb), equal_nan=True):
                    return False
            elif isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb):
                continue
            elif va != vb:
                return False
    return True


# =========================================================================== 1. refit

STEPS, REFIT, BATCH = 20, 0.5, 16
REFIT_STEP = 10  # round(0.5 · 20)


def refit_method(lower_steps: int) -> RecordingJTDS:
    return RecordingJTDS(lower_steps=lower_steps, upper_lr=0.5, refit=REFIT, probe_size=8, fallback=None, **ISSUE8)


def refit_run(method, data, *, callbacks=(), **kw):
    return Trainer(
        class_model(0), method, data, steps=STEPS, batch_size=BATCH, optimizer="sgd", lr=0.05, seed=3,
        device="cpu", progress=False, eval_every=5, callbacks=list(callbacks), **kw,
    ).fit()


@pytest.mark.parametrize("lower_steps", [1, 3])
def test_refit_stops_upper_steps_and_moves_the_lower_stream_to_train_plus_dev_only_after_the_refit_step(lower_steps):
    data = class_data()
    train, dev, val, test = ids_of(data.train), ids_of(data.dev), ids_of(data.val), ids_of(data.test)
    assert not (train & dev) and not ((train | dev) & (val | test))
    method = refit_method(lower_steps)
    events: list[tuple[str, dict]] = []
    phis: dict[str, list] = {}

    def callback(event, info):
        events.append((event, dict(info)))
        if event == "refit":
            phis["at_refit"] = phi(method)
        if event == "eval":
            phis.setdefault("evals", []).append((info["step"], phi(method)))

    result = refit_run(method, data, callbacks=[callback])
    assert result.config["refit_step"] == REFIT_STEP

    # (a) upper steps only up to the refit step: every lower_steps-th step among 1..refit_step
    upper_steps = [info["step"] for ev, info in events if ev == "upper"]
    assert upper_steps == list(range(lower_steps, REFIT_STEP + 1, lower_steps))
    assert len(upper_steps) == REFIT_STEP // lower_steps and max(upper_steps) <= REFIT_STEP
    assert method._upper_steps == REFIT_STEP // lower_steps
    refit_events = [info["step"] for ev, info in events if ev == "refit"]
    assert refit_events == [REFIT_STEP]
    # the refit event comes after the last upper step, and no upper step follows it
    order = [ev for ev, _ in events]
    assert order.index("refit") > max(i for i, ev in enumerate(order) if ev == "upper")
    # the history's refit column: False up to (and including) the eval at the refit step
    assert result.history["step"].tolist() == [5, 10, 15, 20]
    assert result.history["refit"].tolist() == [False, False, True, True]

    # (b) lower steps 0..refit_step-1 read D_train only: its first epoch (9 batches, the last one
    # partial) is exactly D_train once; from the refit step on one epoch of D_train ∪ D_dev (10 batches)
    lower = method.lower_ids
    assert len(lower) == STEPS
    before = [set(t.tolist()) for t in lower[:REFIT_STEP]]
    after = torch.cat(lower[REFIT_STEP:]).tolist()
    assert all(b <= train for b in before)
    assert set().union(*before) == train
    first_epoch = torch.cat(lower[:9]).tolist()
    assert len(first_epoch) == len(train) and set(first_epoch) == train
    assert len(after) == len(train) + len(dev) and set(after) == train | dev  # a permutation of train ∪ dev
    assert set(after) & dev == dev  # every dev label reaches θ after the refit step

    # (c) D_val and D_test never enter a training batch (lower, upper train, upper dev)
    upper_train = set(torch.cat(method.upper_train_ids).tolist())
    seen_dev = set(torch.cat(method.dev_ids).tolist())
    assert upper_train <= train and seen_dev <= dev
    every = set(after) | set().union(*before) | upper_train | seen_dev
    assert not every & (val | test)

    # (d) φ learned before the refit step and is frozen from it on
    assert not same_phi(phis["at_refit"], method.phi0)
    for step, value in phis["evals"]:
        if step >= REFIT_STEP:
            assert same_phi(value, phis["at_refit"]), step
    assert same_phi(phi(method), phis["at_refit"])
    # and the trace's φ after the refit step is that same φ
    alphas = [row["alpha"] for row in result.trace if row["step"] >= REFIT_STEP]
    assert all(np.array_equal(a, alphas[0]) for a in alphas)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after_eval", [10, 15])
def test_resume_across_the_refit_step_is_bit_identical_to_an_uninterrupted_run(tmp_path, stop_after_eval):
    # the checkpoint at step 15 is written after the refit (merged stream mid-epoch), the one at
    # step 10 just before it (the resumed run switches streams itself)
    data = class_data()
    full_method = refit_method(2)
    full = refit_run(full_method, data)
    full_model = full_method._model

    def stop(event, info):
        if event == "eval" and info["step"] == stop_after_eval:
            raise Interrupt

    with pytest.raises(Interrupt):
        refit_run(refit_method(2), data, callbacks=[stop], checkpoint_dir=tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["state"]["step"] == stop_after_eval
    assert saved["state"]["refit"] is (stop_after_eval > REFIT_STEP)

    resumed_method = refit_method(2)
    resumed = refit_run(resumed_method, data, checkpoint_dir=tmp_path, resume=True)
    assert resumed.val_metric == full.val_metric and resumed.test_metric == full.test_metric
    assert resumed.best_step == full.best_step
    cols = [c for c in full.history.columns if c != "seconds"]
    assert resumed.history[cols].equals(full.history[cols])
    assert same_trace(resumed.trace, full.trace)
    assert same_phi(phi(resumed_method), phi(full_method))
    assert resumed_method._upper_steps == full_method._upper_steps == REFIT_STEP // 2
    # the lower batches after the stop are the uninterrupted run's, id for id
    tail = full_method.lower_ids[stop_after_eval:]
    assert len(resumed_method.lower_ids) == len(tail)
    assert all(torch.equal(a, b) for a, b in zip(resumed_method.lower_ids, tail))
    for (ka, va), (kb, vb) in zip(resumed_method._model.state_dict().items(), full_model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_refit_arguments_are_checked():
    for bad in (0, 0.0, 1, 1.0, -0.2, 1.5, True, "half"):
        with pytest.raises(ValueError, match="refit"):
            JTDS(refit=bad)
    with pytest.raises(ValueError, match="upper_data"):
        JTDS(refit=0.5, upper_data="train")
    with pytest.raises(ValueError, match="upper_data"):
        MAOAL(refit=0.5, upper_data="train")
    with pytest.raises(ValueError, match="refit"):
        MAOAL(refit=1.0)
    assert JTDS(refit=0.67).refit == pytest.approx(0.67)


# =========================================================================== regression pieces (2, 3)

REG = TaskSet([Task("y", "regression", primary=True), Task("a", "regression")])


class LinearTrunk(nn.Module):
    """A trainable linear backbone x -> W x + c; with frozen linear heads every loss is quadratic in θ = (W, c)."""

    def __init__(self, d_in: int = 3, width: int = 2):
        super().__init__()
        self.layer1 = nn.Linear(d_in, width)
        self.out_features = width

    def blocks(self):
        return [("layer1", self.layer1)]

    def forward(self, x):
        return self.layer1(x)


class AuxWeight(BilevelMethod):
    """g(θ, ρ) = ∇θ [mean (ŷ − y)² + s·mean (â − a)²], s = softplus(ρ).

    With ŷ = u_yᵀ(W x + c) + d_y, â = u_aᵀ(W x + c) + d_a (heads frozen), J = ∂g/∂θ is the
    Hessian 2·(u_y u_yᵀ + s·u_a u_aᵀ) ⊗ ZᵀZ/n with Z = [X, 1].
    """

    name = "test-aux-weight"

    def __init__(self, *, init: float = -2.0, **kw):
        super().__init__(**kw)
        self.init = float(init)

    def setup(self, model, info):
        super().setup(model, info)
        self.rho = nn.Parameter(torch.tensor([self.init], dtype=DT))

    def hparams(self):
        return [self.rho]

    def direction(self, terms, params, *, create_graph=False):
        s = F.softplus(self.rho[0]) if create_graph else F.softplus(self.rho[0]).detach()
        loss = terms.mean("y") + s * terms.mean("a")
        grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))


def reg_arrays(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT) * torch.tensor([3.0, 1.0, 0.5], dtype=DT)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    a = x @ torch.tensor([0.5, -1.0, 2.0], dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    return x, y, a


def reg_batch(x, y, a, start: int = 0):
    return {PRIMARY_STREAM: (x, {"y": y, "a": a, INDEX_KEY: torch.arange(start, start + len(x))})}


HEADS = {"y": ([1.0, 0.5], 0.2), "a": ([0.3, -1.0], -0.1)}  # frozen heads: (u, d)


def reg_model(seed: int = 0) -> MultiHeadModel:
    torch.manual_seed(seed)
    model = MultiHeadModel.for_tasks(LinearTrunk(), REG).to(DT)
    with torch.no_grad():
        for name, (u, d) in HEADS.items():
            model.heads[name].weight.copy_(torch.tensor([u], dtype=DT))
            model.heads[name].bias.fill_(d)
            model.heads[name].requires_grad_(False)
    return model


def top_eigenvalue_of_J(x: torch.Tensor, s: float) -> float:
    """λ_max of J = 2·M ⊗ ZᵀZ/n in closed form: 2·λ_max(M)·λ_max(ZᵀZ/n), M = u_y u_yᵀ + s·u_a u_aᵀ."""
    z = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
    uy, ua = (torch.tensor(HEADS[k][0], dtype=DT) for k in ("y", "a"))
    m = torch.outer(uy, uy) + s * torch.outer(ua, ua)
    return 2 * float(torch.linalg.eigvalsh(m).max()) * float(torch.linalg.eigvalsh(z.T @ z / len(x)).max())


def predict_np(model, x: torch.Tensor, task: str) -> np.ndarray:
    """ŷ = u_kᵀ(W x + c) + d_k in numpy."""
    w = model.backbone.layer1.weight.detach().numpy()
    c = model.backbone.layer1.bias.detach().numpy()
    u, d = HEADS[task]
    return (x.numpy() @ w.T + c) @ np.array(u) + d


def reg_context(model, train_batch, dev_batch, lr=0.05):
    return UpperContext(
        params=tuple(p for p in model.parameters() if p.requires_grad), tasks=REG, train_batch=train_batch,
        dev_batch=dev_batch, lr=lr, step=1, terms=lambda b, **kw: compute_terms(model, b, REG, **kw),
    )


def reg_info(seed=0):
    return SetupInfo(tasks=REG, device=torch.device("cpu"), num_train=32, seed=seed)


def hand_hypergrad(model, x, y, a, dev, rho, *, terms, eta):
    """dL_dev/dρ by `implicit_grad` on an inner and outer loss written out by hand (not compute_terms)."""
    w, c = model.backbone.layer1.weight, model.backbone.layer1.bias
    params = [w, c]
    rho = rho.detach().clone().requires_grad_()
    (uy, dy), (ua, da) = ((torch.tensor(HEADS[k][0], dtype=DT), HEADS[k][1]) for k in ("y", "a"))

    def pred(xb, u, d):
        return (xb @ w.T + c) @ u + d

    inner = ((pred(x, uy, dy) - y) ** 2).mean() + F.softplus(rho[0]) * ((pred(x, ua, da) - a) ** 2).mean()
    g = torch.autograd.grad(inner, params, create_graph=True)
    outer = sum(((pred(xd, uy, dy) - yd) ** 2).mean() for xd, yd in dev) / len(dev)
    (hg,) = implicit_grad(outer, g, params, (rho,), method="neumann", terms=terms, lr=eta)
    return hg, float(outer.detach())


def hessian_top_eigenvalue(model, x, y, a, s: float) -> float:
    """The same λ_max from an autograd Hessian of the inner loss (a check of the closed form)."""
    (uy, dy), (ua, da) = ((torch.tensor(HEADS[k][0], dtype=DT), HEADS[k][1]) for k in ("y", "a"))

    def inner(flat):
        w, c = flat[:6].reshape(2, 3), flat[6:]
        f = x @ w.T + c
        return ((f @ uy + dy - y) ** 2).mean() + s * ((f @ ua + da - a) ** 2).mean()

    flat = torch.cat([model.backbone.layer1.weight.detach().reshape(-1), model.backbone.layer1.bias.detach()])
    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(inner, flat)).max())


# =========================================================================== 2. hyper_lr="auto"


def test_auto_hyper_lr_is_target_over_the_closed_form_lambda_max_and_is_reestimated_every_auto_every_steps():
    target, every, K = 0.7, 3, 4
    x, y, a = reg_arrays(32, seed=1)
    xd, yd, ad = reg_arrays(12, seed=2)
    model = reg_model()
    method = AuxWeight(lower_steps=1, terms=K, hyper_lr="auto", auto_every=every, auto_target=target,
                       upper_optimizer=Recorder, clip=None)  # Recorder: φ stays put, so J stays the same
    method.setup(model, reg_info())
    s = float(F.softplus(method.rho.detach()[0]))
    lam = top_eigenvalue_of_J(x, s)
    assert lam == pytest.approx(hessian_top_eigenvalue(model, x, y, a, s), rel=1e-12)

    ctx = reg_context(model, lambda: reg_batch(x, y, a), lambda: reg_batch(xd, yd, ad, 100))
    infos = [method.upper_step(model, ctx) for _ in range(7)]
    # λ_max estimated at upper steps 0, 3, 6 only, each time the closed-form value
    assert [k for k, info in enumerate(infos) if "lambda_max" in info] == [0, every, 2 * every]
    for k in (0, every, 2 * every):
        assert infos[k]["lambda_max"] == pytest.approx(lam, rel=1e-3)
    # η = target / λ_max: at the first step from the closed form, and always the last estimate's
    assert infos[0]["hyper_lr"] == pytest.approx(target / lam, rel=1e-3)
    for k, info in enumerate(infos):
        last = infos[k - k % every]["lambda_max"]
        assert info["hyper_lr"] == target / last
    # and that η is the one the Neumann series used (a wrong η, e.g. 1, gives another gradient)
    hg, _ = hand_hypergrad(model, x, y, a, [(xd, yd)], method.rho, terms=K, eta=target / lam)
    hg_wrong, _ = hand_hypergrad(model, x, y, a, [(xd, yd)], method.rho, terms=K, eta=1.0 / lam)
    recorded = method.upper_opt.grads[0][0]
    torch.testing.assert_close(recorded, hg, rtol=1e-3, atol=0)
    assert float((hg - hg_wrong).abs().max()) > 1e-2 * float(hg.abs().max())
    # the estimate is part of the state: a fresh method loading it continues on the same cadence
    other = AuxWeight(lower_steps=1, terms=K, hyper_lr="auto", auto_every=every, auto_target=target,
                      upper_optimizer=Recorder, clip=None)
    other.setup(model, reg_info())
    other.load_state_dict(method.state_dict())
    nxt = other.upper_step(model, ctx)  # upper step 7: no new estimate
    assert "lambda_max" not in nxt and nxt["hyper_lr"] == infos[-1]["hyper_lr"]


def test_auto_hyper_lr_through_the_trainer_reports_eta_and_lambda_on_the_cadence():
    target, every = 1.0, 3
    x, y, a = reg_arrays(32, seed=1)
    xd, yd, ad = reg_arrays(12, seed=2)
    xv, yv, av = reg_arrays(10, seed=3)
    bundle = DataBundle(
        REG, train=TaskDataset(x, {"y": y, "a": a}), dev=TaskDataset(xd, {"y": yd, "a": ad}, torch.arange(100, 112)),
        val=TaskDataset(xv, {"y": yv, "a": av}, torch.arange(200, 210)),
        test=TaskDataset(xv, {"y": yv, "a": av}, torch.arange(300, 310)),
    )
    method = AuxWeight(lower_steps=1, terms=3, hyper_lr="auto", auto_every=every, auto_target=target,
                       upper_optimizer=Recorder, clip=None)
    infos = []
    result = Trainer(
        reg_model(), method, bundle, steps=7, batch_size=32, optimizer="sgd", lr=0.01, seed=0, device="cpu",
        progress=False, eval_every=7, callbacks=[lambda ev, info: infos.append(info) if ev == "upper" else None],
    ).fit()
    # the whole training set is every upper train batch, so J is the closed form at every step
    lam = top_eigenvalue_of_J(x, float(F.softplus(method.rho.detach()[0])))
    assert [info["step"] for info in infos] == list(range(1, 8))
    assert [k for k, info in enumerate(infos) if "lambda_max" in info] == [0, 3, 6]
    for k, info in enumerate(infos):
        assert info["hyper_lr"] == pytest.approx(target / lam, rel=1e-3)
        assert info["hyper_lr"] * lam < 2  # the series converges
    assert result.trace[-1]["upper/hyper_lr"] == infos[-1]["hyper_lr"]


def test_auto_tol_sets_where_the_power_iteration_stops_and_the_estimate_never_exceeds_the_closed_form(monkeypatch):
    import auxnb.hypergrad as hg
    import auxnb.methods.bilevel as bilevel

    x, y, a = reg_arrays(32, seed=1)
    xd, yd, ad = reg_arrays(12, seed=2)
    counts, vjp, power = [], hg._vjp, bilevel.largest_eigenvalue
    inside = [False]

    def counted_power(*args, **kwargs):
        inside[0] = True
        try:
            return power(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(hg, "_vjp", lambda *a_, **k: (counts.append(1) if inside[0] else None) or vjp(*a_, **k))
    monkeypatch.setattr(bilevel, "largest_eigenvalue", counted_power)
    estimates, used = {}, {}
    for tol in (0.5, 1e-2, 1e-9):
        model = reg_model()
        method = AuxWeight(lower_steps=1, terms=2, hyper_lr="auto", auto_tol=tol, upper_optimizer=Recorder, clip=None)
        method.setup(model, reg_info())
        lam = top_eigenvalue_of_J(x, float(F.softplus(method.rho.detach()[0])))
        counts.clear()
        info = method.upper_step(model, reg_context(model, lambda: reg_batch(x, y, a), lambda: reg_batch(xd, yd, ad, 100)))
        estimates[tol], used[tol] = info["lambda_max"], len(counts)
        assert info["lambda_max"] <= lam * (1 + 1e-9)  # a Rayleigh quotient of the symmetric J: never above λ_max
        assert info["hyper_lr"] == 1.0 / info["lambda_max"]
    assert used[0.5] < used[1e-2] < used[1e-9] <= 20
    assert estimates[1e-9] == pytest.approx(lam, rel=1e-8)
    assert estimates[1e-2] == pytest.approx(lam, rel=3e-2)


def test_auto_hyper_lr_arguments_are_checked():
    for bad in (0, 0.0, 2, 2.0, -0.5, 3.0):
        with pytest.raises(ValueError, match="auto_target"):
            AuxWeight(hyper_lr="auto", auto_target=bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="auto_every"):
            AuxWeight(hyper_lr="auto", auto_every=bad)
    with pytest.raises(ValueError, match="hyper_lr"):
        AuxWeight(hyper_lr="automatic")
    assert AuxWeight(hyper_lr="auto", auto_target=1.9).auto_target == 1.9


# =========================================================================== 3. dev_batches


def test_upper_objective_with_three_dev_batches_is_the_mean_of_their_mean_losses():
    x, y, a = reg_arrays(20, seed=1)
    xd, yd, ad = reg_arrays(10, seed=5)
    sizes = [(0, 2), (2, 5), (5, 10)]  # batches of 2, 3 and 5: a mean of means, not a pooled mean
    dev = [(xd[i:j], yd[i:j], ad[i:j]) for i, j in sizes]
    calls = []

    def dev_batch():
        k = len(calls) % 3
        calls.append(k)
        return reg_batch(*dev[k], start=100 + sizes[k][0])

    model = reg_model(1)
    eta, K = 0.02, 3
    method = AuxWeight(lower_steps=1, terms=K, hyper_lr=eta, dev_batches=3, upper_optimizer=Recorder, clip=None)
    method.setup(model, reg_info())
    info = method.upper_step(model, reg_context(model, lambda: reg_batch(x, y, a), dev_batch))
    assert calls == [0, 1, 2]

    # by hand in numpy: a linear model of the inputs, the loss a squared error
    means = [float(np.mean((predict_np(model, xb, "y") - yb.numpy()) ** 2)) for xb, yb, _ in dev]
    pooled = float(np.mean((predict_np(model, xd, "y") - yd.numpy()) ** 2))
    assert info["dev_loss"] == pytest.approx(np.mean(means), rel=1e-12)
    assert abs(np.mean(means) - pooled) > 1e-2 * pooled  # the two readings are far apart here
    # and the hypergradient is that of the mean of the three means
    hg, outer = hand_hypergrad(model, x, y, a, [(xb, yb) for xb, yb, _ in dev], method.rho, terms=K, eta=eta)
    assert outer == pytest.approx(np.mean(means), rel=1e-12)
    torch.testing.assert_close(method.upper_opt.grads[0][0], hg, rtol=1e-10, atol=1e-14)
    # one dev batch: the first batch's mean alone (the next one in the stream)
    one = AuxWeight(lower_steps=1, terms=K, hyper_lr=eta, upper_optimizer=Recorder, clip=None)
    one.setup(model, reg_info())
    calls.clear()
    info_one = one.upper_step(model, reg_context(model, lambda: reg_batch(x, y, a), dev_batch))
    assert calls == [0] and info_one["dev_loss"] == pytest.approx(means[0], rel=1e-12)


def test_dev_batches_draw_consecutive_batches_of_the_dev_stream_in_the_trainer():
    # dev: 24 samples, batches of 8, dev_batches=3: each upper step reads one whole pass over D_dev
    data = class_data()
    dev = ids_of(data.dev)
    method = RecordingJTDS(lower_steps=2, dev_batches=3, probe_size=0, refit=None, **ISSUE8)  # refit off: 3 upper steps
    Trainer(class_model(0), method, data, steps=6, batch_size=8, optimizer="sgd", lr=0.05, seed=1, device="cpu",
            progress=False, eval_every=6).fit()
    assert method.dev_calls == [3, 3, 3]
    for k in range(3):
        seen = torch.cat(method.dev_ids[3 * k : 3 * k + 3]).tolist()
        assert len(seen) == len(dev) and set(seen) == dev
    # a persistent shuffled stream: the next pass comes in another order
    assert not torch.equal(torch.cat(method.dev_ids[:3]), torch.cat(method.dev_ids[3:6]))


def test_dev_batches_arguments_are_checked():
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="dev_batches"):
            AuxWeight(dev_batches=bad)
    with pytest.raises(ValueError, match="dev_batches"):
        JTDS(dev_batches=0)
    with pytest.raises(ValueError, match="dev_batches"):
        MAOAL(dev_batches=0)


# =========================================================================== 4. upper_data="train" (MAOAL)


class RecordingMAOAL(MAOAL):
    """Records the lower batches' ids and every training batch the upper step draws, in order."""

    def setup(self, model, info):
        super().setup(model, info)
        self.lower_ids: list[torch.Tensor] = []
        self.upper_batches: list[list[torch.Tensor]] = []

    def direction(self, terms, params, *, create_graph=False):
        if not create_graph:
            self.lower_ids.append(terms.index[PRIMARY_STREAM].clone())
        return super().direction(terms, params, create_graph=create_graph)

    def upper_step(self, model, context):
        fetch = context.train_batch
        drawn: list[torch.Tensor] = []
        self.upper_batches.append(drawn)

        def train_batch():
            batch = fetch()
            drawn.append(batch[PRIMARY_STREAM][1][INDEX_KEY].clone())
            return batch

        def dev_batch():  # the Trainer's own D_dev reader must not be used
            raise AssertionError("upper_data='train' read the dev stream")

        replaced = {"train_batch": train_batch, "dev_batch": dev_batch}
        primary = context.primary_train_batch
        if primary is not None:  # the upper objective's batch: same second stream, evaluation transform

            def primary_train_batch():
                batch = primary()
                drawn.append(batch[PRIMARY_STREAM][1][INDEX_KEY].clone())
                return batch

            replaced["primary_train_batch"] = primary_train_batch
        return super().upper_step(model, dataclasses.replace(context, **replaced))


def test_maoal_with_upper_data_train_has_no_dev_split_and_measures_the_upper_loss_on_a_second_train_batch():
    data = class_data()
    train, dev, val, test = ids_of(data.train), ids_of(data.dev), ids_of(data.val), ids_of(data.test)
    # the paper's configuration learns α on D_dev; the default (issue 8) on training batches
    assert MAOAL(upper_data="dev").uses_dev is True and MAOAL.paper("cifar").uses_dev is True
    assert MAOAL().upper_data == "train" and MAOAL().uses_dev is False
    method = RecordingMAOAL("block", lower_steps=2, upper_data="train", upper_lr=0.1)
    assert method.uses_dev is False
    merged = data.for_method(False)
    model = class_model(0)
    checks = []

    def callback(event, info):
        if event == "upper":  # θ here is θ at the upper step (the upper step never changes it)
            ids = method.upper_batches[-1][1]
            x, t = merged.train.gather(merged.train.positions_of(ids))
            with torch.no_grad():
                _, out = model(x, [PRIMARY])
            checks.append((info["dev_loss"], float(F.cross_entropy(out[PRIMARY], t[PRIMARY]))))

    result = Trainer(model, method, data, steps=10, batch_size=BATCH, optimizer="sgd", lr=0.05, seed=2,
                     device="cpu", progress=False, eval_every=5, callbacks=[callback]).fit()
    # D_dev is not carved out: it is part of D_train, and no dev split is left
    assert result.config["data"]["dev"] == 0 and result.config["data"]["train"] == len(train) + len(dev) == 160
    # the lower stream: one epoch (10 batches of 16) over train ∪ dev, each id once
    lower = torch.cat(method.lower_ids).tolist()
    assert len(lower) == 160 and set(lower) == train | dev
    # every upper step draws two training batches: g(θ, φ) on the first, the upper loss on the second;
    # 5 upper steps = 10 batches = one epoch of the second training stream, each id once
    assert len(method.upper_batches) == 5 and all(len(b) == 2 for b in method.upper_batches)
    upper = torch.cat([t for pair in method.upper_batches for t in pair]).tolist()
    assert len(upper) == 160 and set(upper) == train | dev
    assert not (set(upper) | set(lower)) & (val | test)
    # the second training stream is its own stream, not the lower one
    assert upper != lower
    # the upper objective was the primary mean loss on the second batch, at θ of the upper step
    assert len(checks) == 5
    for got, expected in checks:
        assert got == pytest.approx(expected, rel=1e-10)
    # φ learned from it
    assert not torch.equal(method.alpha.detach(), torch.ones_like(method.alpha))


# =========================================================================== 5. JTDS normalize="softmax"

SOFT_TASKS = TaskSet([
    Task("main", "classification", 3, primary=True),
    Task("attr", "binary"),
    Task("empty", "binary"),  # no labelled sample in the batch
])


class _Features(nn.Module):
    """Stands in for a model: JTDS only asks it for the feature size."""

    def __init__(self, d: int):
        super().__init__()
        self.out_features = d


def _softplus(v):
    return np.log1p(np.exp(v))


def _zscore_np(l, m, eps=1e-6):
    out = np.zeros_like(l)
    if m.any():
        mu = l[m].mean()
        sd = np.sqrt(((l[m] - mu) ** 2).mean())
        out[m] = (l[m] - mu) / (sd + eps)
    return out


def _softmax_by_hand(alpha, proto, slope, feats, loss, mask, primary=0):
    """σ1(α_k)/σ1(α_G)·n_k·exp(z_ik)/Σ_{j labelled} exp(z_jk), z_ik = P_kᵀc_i + a_k·l̂_ik; 0 where masked.

    The task factor is relative to the primary task's (column `primary`), so the primary column's
    weights sum to its labelled count whatever α is."""
    b, k = loss.shape
    w = np.zeros((b, k))
    for j in range(k):
        m = mask[:, j]
        if not m.any():
            continue
        z = np.zeros(b)
        if proto is not None:
            z = z + feats @ proto[j]
        if slope is not None:
            z = z + slope[j] * _zscore_np(loss[:, j], m)
        e = np.exp(z[m] - z[m].max())
        w[m, j] = _softplus(alpha[j]) / _softplus(alpha[primary]) * m.sum() * e / e.sum()
    return w


def _soft_batch(rng, b=6, d=4):
    loss = rng.uniform(0.1, 3.0, (b, 3))
    mask = np.ones((b, 3), dtype=bool)
    mask[2, 0] = False  # a missing primary label
    mask[4, 1] = False
    mask[:, 2] = False  # the "empty" task: no label in this batch
    loss[~mask] = 0.0
    feats = rng.normal(size=(b, d))
    terms = LossTerms(
        SOFT_TASKS,
        {t.name: torch.tensor(loss[:, j]) for j, t in enumerate(SOFT_TASKS)},
        {t.name: torch.tensor(mask[:, j]) for j, t in enumerate(SOFT_TASKS)},
        {}, {PRIMARY_STREAM: torch.tensor(feats)}, {},
    )
    return terms, loss, mask, feats


def _jtds_softmax(variant):
    torch.set_default_dtype(torch.float64)
    try:
        method = JTDS(variant, normalize="softmax", **ISSUE8)
        method.setup(_Features(4), SetupInfo(tasks=SOFT_TASKS, device=torch.device("cpu"), num_train=10, seed=0,
                                             generator=torch.Generator().manual_seed(0)))
        rng = np.random.default_rng(7)
        with torch.no_grad():  # a non-trivial φ: large enough scores that the softmax is far from uniform
            method.alpha.copy_(torch.as_tensor(rng.uniform(-1, 1.5, 3)))
            if method.prototypes is not None:
                method.prototypes.copy_(torch.as_tensor(rng.normal(0, 0.8, method.prototypes.shape)))
            if method.filter_a is not None:
                method.filter_a.copy_(torch.as_tensor([-1.5, 1.2, 0.7]))
                method.filter_b.copy_(torch.as_tensor([0.3, -0.4, 0.2]))
    finally:
        torch.set_default_dtype(torch.float32)
    return method, rng


def _numpy_phi(method):
    alpha = method.alpha.detach().numpy().copy()
    proto = None if method.prototypes is None else method.prototypes.detach().numpy().copy()
    slope = None if method.filter_a is None else method.filter_a.detach().numpy().copy()
    return alpha, proto, slope


@pytest.mark.parametrize("variant", ["full", "no-feature", "no-loss"])
def test_softmax_weights_equal_the_hand_formula_sum_to_the_labelled_count_and_are_zero_where_masked(variant):
    method, rng = _jtds_softmax(variant)
    terms, loss, mask, feats = _soft_batch(rng)
    sched = method.schedule(terms)
    got = torch.stack([sched[t.name] for t in SOFT_TASKS], 1)
    alpha, proto, slope = _numpy_phi(method)
    expected = _softmax_by_hand(alpha, proto, slope, feats, loss, mask)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10, atol=1e-14)
    # the primary task's weights themselves sum to its labelled count (its task factor is exactly 1)
    np.testing.assert_allclose(got.detach().numpy()[:, 0].sum(), mask[:, 0].sum(), rtol=1e-12, atol=0)
    # the sample part: mean 1 over each task's labelled samples (sum = n_k), 0 where masked
    sample = got.detach().numpy() / (_softplus(alpha) / _softplus(alpha[0]))[None, :]
    np.testing.assert_allclose(sample.sum(0), mask.sum(0), rtol=1e-10, atol=1e-12)
    assert np.all(sample[~mask] == 0.0)
    assert np.all(got.detach().numpy()[:, 2] == 0.0)  # the unlabelled task column
    # the weights separate samples (the softmax is not uniform here)
    assert np.ptp(sample[mask[:, 0], 0]) > 0.5
    # b_k cancels in the softmax: changing it leaves the weights unchanged
    if method.filter_b is not None:
        with torch.no_grad():
            method.filter_b.add_(5.0)
        again = torch.stack([method.schedule(terms)[t.name] for t in SOFT_TASKS], 1)
        torch.testing.assert_close(again, got, rtol=1e-12, atol=0)


@pytest.mark.parametrize("variant", ["full", "no-feature", "no-loss"])
def test_softmax_weights_backward_to_phi_is_finite_and_matches_finite_differences(variant):
    method, rng = _jtds_softmax(variant)
    terms, loss, mask, feats = _soft_batch(rng)
    probe = rng.normal(size=loss.shape)  # a random linear functional of the weights

    def by_hand(alpha, proto, slope):
        return float((_softmax_by_hand(alpha, proto, slope, feats, loss, mask) * probe).sum())

    w = torch.stack([method.schedule(terms)[t.name] for t in SOFT_TASKS], 1)
    (w * torch.as_tensor(probe)).sum().backward()
    # the weighted lower objective too (what the upper step differentiates): finite gradients
    obj_grads = torch.autograd.grad(method.objective(terms), method.hparams(), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in obj_grads)

    alpha, proto, slope = _numpy_phi(method)
    h = 1e-6
    named = [("alpha", method.alpha, alpha)]
    if proto is not None:
        named.append(("prototypes", method.prototypes, proto))
    if slope is not None:
        named.append(("filter_a", method.filter_a, slope))
    for name, param, value in named:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        fd = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            args = {"alpha": alpha, "proto": proto, "slope": slope}
            key = {"alpha": "alpha", "prototypes": "proto", "filter_a": "slope"}[name]
            plus, minus = value.copy(), value.copy()
            plus[idx] += h
            minus[idx] -= h
            fd[idx] = (by_hand(**{**args, key: plus}) - by_hand(**{**args, key: minus})) / (2 * h)
        np.testing.assert_allclose(param.grad.numpy(), fd, rtol=1e-5, atol=1e-8, err_msg=name)
        if name != "alpha":  # the unlabelled task's score parameters get exactly no gradient
            assert np.all(param.grad.numpy()[2] == 0.0), name
    assert float(np.abs(method.alpha.grad.numpy()[:2]).min()) > 0  # a non-trivial gradient
    if method.filter_b is not None:  # b_k does not enter the softmax weights
        assert method.filter_b.grad is None or torch.all(method.filter_b.grad == 0)


def test_softmax_jtds_in_the_trainer_keeps_mean_weight_sigma1_alpha_and_never_moves_b():
    data = class_data()
    method = RecordingJTDS(normalize="softmax", **ISSUE8, lower_steps=3, hyper_lr=0.1, upper_lr=0.5, probe_size=0, refit=None,
                           fallback=None)
    result = Trainer(class_model(0), method, data, steps=10, batch_size=BATCH, optimizer="sgd", lr=0.05, seed=0,
                     device="cpu", progress=False, eval_every=10).fit()
    last = result.trace[-1]
    # the last lower step (10) came after the last upper step (9): its mean weight per task is
    # σ1(α_k)/σ1(α_label), 1 for the primary task (φ is float32 here: JTDS makes it in the default dtype)
    sigma = last["task_weight"]  # σ1(α) per task, in task order (label first)
    np.testing.assert_allclose(last["batch_mean_weight"], sigma / sigma[0], rtol=1e-5)
    assert last["batch_mean_weight"][0] == pytest.approx(1.0, rel=1e-6)
    assert all(np.isfinite(p.detach().numpy()).all() for p in method.hparams())
    a0, p0 = method.phi0[2].numpy(), method.phi0[1].numpy()  # φ = [α, P, a, b]
    assert not np.array_equal(last["filter_a"], a0)  # the slope and the prototypes learned
    assert not np.array_equal(method.prototypes.detach().numpy(), p0)
    np.testing.assert_array_equal(last["filter_b"], np.zeros(2))  # its hypergradient is exactly 0


def test_unknown_normalize_is_a_clear_error():
    with pytest.raises(ValueError, match="normalize"):
        JTDS(normalize="bogus")


# =========================================================================== 6. JTDS: the primary task's weight is pinned

PIN_TASKS = TaskSet([
    Task("main", "classification", 3, primary=True),
    Task("attr", "binary"),
    Task("rot", "classification", 4, stream="rot"),  # another stream: pinned to the primary's α too
])


def _pin_terms(rng, b=6, b_rot=8, d=4):
    loss = rng.uniform(0.1, 3.0, (b, 2))
    mask = np.ones((b, 2), dtype=bool)
    mask[[1, 4], 0] = False  # missing primary labels: they take no part in its mean
    mask[3, 1] = False
    loss[~mask] = 0.0
    loss_rot = rng.uniform(0.1, 2.0, b_rot)
    feats = {PRIMARY_STREAM: rng.normal(size=(b, d)), "rot": rng.normal(size=(b_rot, d))}
    terms = LossTerms(
        PIN_TASKS,
        {"main": torch.tensor(loss[:, 0]), "attr": torch.tensor(loss[:, 1]), "rot": torch.tensor(loss_rot)},
        {"main": torch.tensor(mask[:, 0]), "attr": torch.tensor(mask[:, 1]), "rot": torch.ones(b_rot, dtype=torch.bool)},
        {}, {k: torch.tensor(v) for k, v in feats.items()}, {},
    )
    return terms, mask


@pytest.mark.parametrize("variant", ["full", "no-feature", "no-loss", "only-task"])
def test_batch_mean_pins_the_primary_mean_weight_at_one_whatever_alpha_and_alpha_primary_gets_no_gradient(variant):
    # normalize="batch_mean": w_ik = σ1(α_k)/σ1(α_main) · s_ik / mean_{j labelled} s_jk, so over the
    # primary task's labelled samples the mean weight is exactly 1 for every α (α_main cancels
    # exactly: x/x = 1 in floating point), and each other task's mean weight is σ1(α_k)/σ1(α_main).
    torch.set_default_dtype(DT)
    try:
        method = JTDS(variant, normalize="batch_mean", **ISSUE8)
        method.setup(_Features(4), SetupInfo(tasks=PIN_TASKS, device=torch.device("cpu"), num_train=10, seed=0,
                                             generator=torch.Generator().manual_seed(0)))
    finally:
        torch.set_default_dtype(torch.float32)
    assert method.normalize == "batch_mean" and JTDS().normalize == "batch_mean"  # the default too
    rng = np.random.default_rng(11)
    terms, mask = _pin_terms(rng)
    with torch.no_grad():  # a scheduler far from its initial values, so the sample part is not flat
        if method.prototypes is not None:
            method.prototypes.copy_(torch.as_tensor(rng.normal(0, 0.8, method.prototypes.shape)))
        if method.filter_a is not None:
            method.filter_a.copy_(torch.as_tensor([-1.5, 1.2, 0.7]))
            method.filter_b.copy_(torch.as_tensor([0.3, -0.4, 0.2]))
    primary_weights = []
    for alpha in ([1.0, 1.0, 1.0], [-30.0, 0.4, 2.0], [0.0, -3.0, 0.5], [40.0, 7.0, -1.0], [-2.5, -2.5, 9.0]):
        with torch.no_grad():
            method.alpha.copy_(torch.tensor(alpha, dtype=DT))
        sched = method.schedule(terms)
        w_main = sched["main"]
        # the primary task's mean weight over its labelled samples is 1
        assert float(w_main.detach()[terms.masks["main"]].mean()) == pytest.approx(1.0, rel=1e-13, abs=0)
        # the other tasks' mean weights are σ1(α_k)/σ1(α_main), by hand (softplus in numpy)
        ratio = _softplus(np.array(alpha[1:])) / _softplus(alpha[0])
        assert float(sched["attr"].detach()[terms.masks["attr"]].mean()) == pytest.approx(ratio[0], rel=1e-12)
        assert float(sched["rot"].detach().mean()) == pytest.approx(ratio[1], rel=1e-12)
        # the primary weights do not depend on α at all: no component of α, α_main included, gets a
        # gradient from them (a random linear functional of the weights). The other components are
        # exactly 0; α_main's is 0 up to the rounding of d(x/x)/dx = 1/x − x/x² (a few ulps of the
        # functional's scale; an unpinned σ1(α_main) would give σ1'/σ1 · Σ probe·w, of order 1).
        probe = torch.as_tensor(rng.normal(size=len(w_main)))
        functional = (w_main * probe).sum()
        (grad,) = torch.autograd.grad(functional, method.alpha, allow_unused=True)
        if grad is not None:
            assert torch.all(grad[1:] == 0), grad
            scale = float((w_main.detach() * probe).abs().sum())
            assert abs(float(grad[0])) <= 1e-13 * scale, (grad, scale)
        primary_weights.append(w_main.detach())
        if variant == "only-task":
            torch.testing.assert_close(w_main, torch.ones_like(w_main), rtol=0, atol=0)
    # and they are bit for bit the same whatever α is
    assert all(torch.equal(w, primary_weights[0]) for w in primary_weights[1:])


def test_batch_mean_with_the_primary_task_alone_gives_alpha_primary_exactly_zero_hypergradient():
    # variant "no-aux": w_i = σ1(α_main)/σ1(α_main) · s_i / mean s = s_i / mean s, so the lower
    # direction, hence the hypergradient of α_main, is 0 in a real upper step (to rounding: see the
    # test above), while the scheduler's other parameters (prototypes, loss filter) do get one.
    data = class_data()
    model = class_model(0)
    torch.set_default_dtype(DT)  # φ in float64, like the model, so that "0" means rounding only
    try:
        method = JTDS("no-aux", normalize="batch_mean", hyper_lr=0.1, upper_optimizer=Recorder, clip=None, **ISSUE8)
        method.setup(model, SetupInfo(tasks=data.tasks, device=torch.device("cpu"), num_train=len(data.train), seed=0))
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        method.alpha.fill_(0.3)
        method.filter_a.fill_(-0.8)
    train = {PRIMARY_STREAM: data.train.gather(torch.arange(16))}
    dev = {PRIMARY_STREAM: data.dev.gather(torch.arange(8))}
    context = UpperContext(params=tuple(model.parameters()), tasks=data.tasks, train_batch=lambda: train,
                           dev_batch=lambda: dev, lr=0.05, step=1,
                           terms=lambda b, **kw: compute_terms(model, b, data.tasks, **kw))
    method.upper_step(model, context)
    grads = dict(zip(["alpha", "prototypes", "filter_a", "filter_b"], method.upper_opt.grads[0]))
    assert grads["alpha"].dtype == DT
    signal = min(float(grads["prototypes"].abs().max()), float(grads["filter_a"].abs().max()))
    assert signal > 1e-6  # the upper step has a real hypergradient for the sample part
    assert float(grads["alpha"].abs().max()) <= 1e-12 * signal, (grads["alpha"], signal)


# =========================================================================== 7. compute_terms(freeze_aux_buffers=True) with BatchNorm

BN_TASKS = TaskSet([Task("y", "classification", 3, primary=True), Task("r", "regression", stream="aux")])


class BNTrunk(nn.Module):
    """x -> relu(BN(W x + c)): one BatchNorm layer whose statistics the test follows by hand."""

    def __init__(self, d_in: int = 4, width: int = 5):
        super().__init__()
        self.linear = nn.Linear(d_in, width)
        self.bn = nn.BatchNorm1d(width, momentum=0.3)
        self.out_features = width

    def blocks(self):
        return [("layer1", self)]

    def forward(self, x):
        return torch.relu(self.bn(self.linear(x)))


def bn_model() -> MultiHeadModel:
    torch.manual_seed(4)
    model = MultiHeadModel.for_tasks(BNTrunk(), BN_TASKS).to(DT)
    with torch.no_grad():  # non-trivial affine parameters and running statistics, a non-zero count
        model.backbone.bn.weight.copy_(torch.tensor([1.5, 0.7, -0.4, 2.0, 1.1], dtype=DT))
        model.backbone.bn.bias.copy_(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2], dtype=DT))
        model.backbone.bn.running_mean.copy_(torch.tensor([0.4, -1.0, 2.0, 0.3, -0.2], dtype=DT))
        model.backbone.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 3.0, 0.8], dtype=DT))
        model.backbone.bn.num_batches_tracked.fill_(7)
    return model.train()


def bn_batch():
    g = torch.Generator().manual_seed(9)
    xp = torch.randn(12, 4, generator=g, dtype=DT) + 1.0
    xa = 3.0 * torch.randn(10, 4, generator=g, dtype=DT) - 2.0  # statistics far from the primary batch's
    return {
        PRIMARY_STREAM: (xp, {"y": torch.randint(0, 3, (12,), generator=g), INDEX_KEY: torch.arange(12)}),
        "aux": (xa, {"r": torch.randn(10, generator=g, dtype=DT), INDEX_KEY: torch.arange(10)}),
    }


def bn_by_hand(params: dict[str, torch.Tensor], batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features of each stream normalised with that stream's own batch statistics (biased variance),
    and mean CE(y) + mean squared error(r), written without nn modules or buffers."""
    def features(x):
        h = x @ params["backbone.linear.weight"].T + params["backbone.linear.bias"]
        mu, var = h.mean(0), h.var(0, unbiased=False)
        return torch.relu((h - mu) / torch.sqrt(var + 1e-5) * params["backbone.bn.weight"] + params["backbone.bn.bias"])

    (xp, tp), (xa, ta) = batch[PRIMARY_STREAM], batch["aux"]
    fp, fa = features(xp), features(xa)
    logits = fp @ params["heads.y.weight"].T + params["heads.y.bias"]
    pred = (fa @ params["heads.r.weight"].T + params["heads.r.bias"])[:, 0]
    ce = -(torch.log_softmax(logits, 1)[torch.arange(len(xp)), tp["y"]]).mean()
    return {PRIMARY_STREAM: fp, "aux": fa}, ce + ((pred - ta["r"]) ** 2).mean()


def test_freeze_aux_buffers_keeps_aux_statistics_out_of_batchnorm_and_backward_through_both_streams_works():
    model = bn_model()
    bn = model.backbone.bn
    before = {k: v.clone() for k, v in bn.named_buffers()}
    batch = bn_batch()
    terms = compute_terms(model, batch, BN_TASKS, freeze_aux_buffers=True)

    # running statistics: exactly one update, the primary stream's (momentum 0.3, unbiased variance)
    with torch.no_grad():
        h = model.backbone.linear(batch[PRIMARY_STREAM][0])
    m = bn.momentum
    torch.testing.assert_close(bn.running_mean, (1 - m) * before["running_mean"] + m * h.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, (1 - m) * before["running_var"] + m * h.var(0, unbiased=True),
                               rtol=1e-12, atol=1e-14)
    assert int(bn.num_batches_tracked) == int(before["num_batches_tracked"]) + 1 == 8
    assert bn.track_running_stats is True and bn.training  # the switch is restored

    # both streams normalised with their own batch statistics (not the running ones), by hand
    params = dict(model.named_parameters())
    feats, loss_by_hand = bn_by_hand(params, batch)
    torch.testing.assert_close(terms.features[PRIMARY_STREAM], feats[PRIMARY_STREAM], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.features["aux"], feats["aux"], rtol=1e-12, atol=1e-12)

    # backward through the summed losses: the primary forward saved the running buffers, which an
    # in-place restore after the aux forward used to modify (autograd then refused the backward)
    loss = terms.mean("y") + terms.mean("r")
    torch.testing.assert_close(loss, loss_by_hand, rtol=1e-12, atol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    expected = torch.autograd.grad(bn_by_hand(params, batch)[1], [params[n] for n in names])
    for name, got, exp in zip(names, grads, expected):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12, msg=name)
    assert all(float(g.abs().max()) > 0 for g in grads)  # every parameter is reached by the loss

    # the contrast: without freezing, the aux batch enters the running statistics as a second update
    plain = bn_model()
    compute_terms(plain, batch, BN_TASKS, freeze_aux_buffers=False)
    with torch.no_grad():
        ha = plain.backbone.linear(batch["aux"][0])
    mean_after_primary = (1 - m) * before["running_mean"] + m * h.mean(0)
    torch.testing.assert_close(plain.backbone.bn.running_mean, (1 - m) * mean_after_primary + m * ha.mean(0),
                               rtol=1e-12, atol=1e-14)
    assert int(plain.backbone.bn.num_batches_tracked) == 9
    assert not torch.allclose(plain.backbone.bn.running_mean, bn.running_mean)
