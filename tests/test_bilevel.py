"""Tests for the shared bi-level upper step (auxnb.methods.bilevel.BilevelMethod) through the
real Trainer and data pipeline, in float64, against independent truth: hand-computed upper steps,
first-order gradients computed separately, finite differences of a converged bi-level problem."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxnb.data import SyntheticSource, TaskDataset, build_bundle
from auxnb.hypergrad import HypergradWarning, implicit_grad
from auxnb.methods.base import compute_terms
from auxnb.methods.bilevel import BilevelMethod
from auxnb.models import MultiHeadModel
from auxnb.tasks import PRIMARY_STREAM, Task, TaskSet
from auxnb.train import BatchStream, Trainer, UpperContext

DT = torch.float64
PRIMARY = "label"
AUX = ("aux", "noise")


# --------------------------------------------------------------------------- a minimal bi-level method


class LearnedAuxWeights(BilevelMethod):
    """Test-only bi-level method: one non-negative weight per auxiliary task.

    g(θ, ρ) = ∇θ [L_primary + Σ_k w_k L_k + ½·l2·‖θ‖²] with w = softplus(ρ) (``nonneg="softplus"``)
    or w = ρ clamped to ≥ 0 after each upper step (``nonneg="clamp"``). It records the sample ids
    that enter each lower direction, each upper train batch and each dev batch.
    """

    name = "test-learned-aux-weights"

    def __init__(self, *, nonneg: str = "softplus", init: float = 0.0, l2: float = 0.0, reg: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.nonneg, self.init, self.l2, self.reg = nonneg, float(init), float(l2), float(reg)

    def setup(self, model, info):
        super().setup(model, info)
        p = next(model.parameters())
        self.aux_names = [t.name for t in info.tasks.auxiliary]
        self.rho = nn.Parameter(torch.full((len(self.aux_names),), self.init, dtype=p.dtype, device=p.device))
        self.lower_ids: list[torch.Tensor] = []
        self.upper_train_ids: list[torch.Tensor] = []
        self.dev_ids: list[torch.Tensor] = []

    def hparams(self):
        return [self.rho]

    def aux_weights(self) -> torch.Tensor:
        return F.softplus(self.rho) if self.nonneg == "softplus" else self.rho

    def direction(self, terms, params, *, create_graph=False):
        (self.upper_train_ids if create_graph else self.lower_ids).append(terms.index[PRIMARY_STREAM].clone())
        w = self.aux_weights() if create_graph else self.aux_weights().detach()
        loss = terms.mean(terms.primary)
        for k, name in enumerate(self.aux_names):
            loss = loss + w[k] * terms.mean(name)
        if self.l2:
            loss = loss + 0.5 * self.l2 * sum((p**2).sum() for p in params)
        grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def regulariser(self, terms):
        # an explicit upper term (like DTG Eq. 14): reg · Σ_k w_k²
        return self.reg * (self.aux_weights() ** 2).sum() if self.reg else None

    def project(self):
        if self.nonneg == "clamp":
            self.rho.clamp_(min=0.0)

    def upper_step(self, model, context):
        fetch = context.dev_batch

        def dev_batch():
            batch = fetch()
            self.dev_ids.append(batch[PRIMARY_STREAM][1]["index"].clone())
            return batch

        return super().upper_step(model, dataclasses.replace(context, dev_batch=dev_batch))

    def trace(self):
        return {**super().trace(), "weights": self.aux_weights().detach().tolist()}


# --------------------------------------------------------------------------- data, model, recorder


class BNTrunk(nn.Module):
    """Two Linear → BatchNorm → ReLU blocks (a backbone with running statistics)."""

    def __init__(self, d_in: int, width: int) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(d_in, width), nn.BatchNorm1d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
        self.out_features = width

    def blocks(self):
        return [("layer1", self.layer1), ("layer2", self.layer2)]

    def forward(self, x):
        return self.layer2(self.layer1(x))


def make_tasks() -> TaskSet:
    return TaskSet(
        [
            Task(PRIMARY, "classification", 3, primary=True),
            Task("aux", "classification", 6),  # helpful: the primary label refined by a sign
            Task("noise", "classification", 3),  # random labels
        ]
    )


def make_data(n: int = 240, dev_size: int = 24, seed: int = 0, dim: int = 6):
    src = SyntheticSource(n=n, dim=dim, num_classes=3, aux="helpful", noise=0.3, seed=seed)
    x, y, aux = src.tensors()
    noise = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 1))
    source = TaskDataset(x.to(DT), {PRIMARY: y, "aux": aux, "noise": noise})
    return build_bundle(source, make_tasks(), val_size=40, test_size=40, dev_size=dev_size, seed=seed)


def make_model(seed: int = 0, d_in: int = 6, width: int = 8) -> MultiHeadModel:
    torch.manual_seed(seed)
    return MultiHeadModel.for_tasks(BNTrunk(d_in, width), make_tasks()).to(DT)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class Recorder:
    """A lower SGD that inspects every lower step the Trainer takes.

    At each `step()` it checks that every ``.grad`` is graph-free, optionally recomputes the lower
    direction independently (first-order autograd on a copy of the model and the same samples)
    and stores the parameters after the step; the Trainer's ``"upper"`` callback compares the
    model with that snapshot.
    """

    def __init__(self, model, data, method, *, lr: float = 0.05, check_direction: bool = False):
        self.model, self.data, self.method, self.lr = model, data, method, lr
        self.check_direction = check_direction
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.thetas: list[torch.Tensor] = []
        self.direction_errors: list[float] = []
        self.graph_grads = 0
        self.hparam_grads = 0
        self.upper_checks: list[dict[str, bool]] = []

    def optimizer(self, params):
        recorder = self

        class RecordingSGD(torch.optim.SGD):
            def step(self, closure=None):
                recorder.before_step(self)
                out = super().step(closure)
                recorder.after_step()
                return out

        return RecordingSGD(params, lr=self.lr)

    def independent_direction(self) -> tuple[torch.Tensor, ...]:
        ids = self.method.lower_ids[-1]
        x, t = self.data.train.gather(self.data.train.positions_of(ids))
        twin = copy.deepcopy(self.model)  # same θ and buffers; train mode: batch statistics
        _, out = twin(x)
        w = self.method.aux_weights().detach()
        loss = F.cross_entropy(out[PRIMARY], t[PRIMARY])
        for k, name in enumerate(AUX):
            loss = loss + w[k] * F.cross_entropy(out[name], t[name])
        return torch.autograd.grad(loss, [p for p in twin.parameters() if p.requires_grad])

    def before_step(self, opt):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None and (p.grad.requires_grad or p.grad.grad_fn is not None):
                    self.graph_grads += 1
        self.hparam_grads += sum(h.grad is not None for h in self.method.hparams())
        if self.check_direction:
            expected = self.independent_direction()
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.direction_errors.append(
                max(float((p.grad - e).abs().max() / (e.abs().max() + 1e-300)) for p, e in zip(params, expected))
            )

    def after_step(self):
        self.snapshot = state(self.model)
        self.thetas.append(torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).clone())

    def callback(self, event, info):
        if event == "upper":
            now = state(self.model)
            buffers = {n for n, _ in self.model.named_buffers()}
            self.upper_checks.append(
                {
                    "buffers": all(torch.equal(now[k], self.snapshot[k]) for k in buffers),
                    "params": all(torch.equal(now[k], self.snapshot[k]) for k in now if k not in buffers),
                    "param_grads_none": all(p.grad is None for p in self.model.parameters()),
                }
            )


def run(method, *, steps=12, data=None, seed=0, lr=0.05, check_direction=False, batch_size=16, eval_every=None, **kw):
    data = data if data is not None else make_data()
    model = make_model(seed)
    rec = Recorder(model, data, method, lr=lr, check_direction=check_direction)
    trainer = Trainer(
        model, method, data, steps=steps, batch_size=batch_size, optimizer=rec.optimizer, seed=seed,
        device="cpu", progress=False, callbacks=[rec.callback], eval_every=eval_every or steps, **kw,
    )
    return trainer.fit(), rec, model


# --------------------------------------------------------------------------- (a, b) upper step leaves θ and buffers alone


def test_upper_step_leaves_every_buffer_and_theta_bit_identical_and_writes_no_theta_grad():
    method = LearnedAuxWeights(lower_steps=3, terms=3, hyper_lr=0.1, upper_optimizer="sgd", upper_lr=0.5)
    _, rec, model = run(method, steps=12)
    assert len(rec.upper_checks) == 4
    for check in rec.upper_checks:
        assert check == {"buffers": True, "params": True, "param_grads_none": True}
    # the buffers are live: the 12 lower forwards counted, the 4 upper steps' 8 forwards did not
    assert int(rec.snapshot["backbone.layer1.1.num_batches_tracked"]) == 12
    # and φ did move: the upper steps ran for real
    assert not torch.equal(method.rho.detach(), torch.zeros(2, dtype=DT))


# --------------------------------------------------------------------------- (c) no dev leak


def test_dev_ids_never_enter_a_lower_direction_and_dev_stream_cycles_through_all_of_dev():
    data = make_data()
    dev_ids = set(data.dev.index.tolist())
    train_ids = set(data.train.index.tolist())
    assert dev_ids and not dev_ids & train_ids
    method = LearnedAuxWeights(lower_steps=2, terms=2, hyper_lr=0.1, upper_optimizer="sgd", upper_lr=0.5)
    run(method, steps=16, data=data, batch_size=16)
    lower = set(torch.cat(method.lower_ids).tolist())
    assert len(method.lower_ids) == 16
    assert lower <= train_ids and not lower & dev_ids
    upper_train = set(torch.cat(method.upper_train_ids).tolist())
    assert upper_train <= train_ids
    seen_dev = torch.cat(method.dev_ids).tolist()
    assert set(seen_dev) <= dev_ids
    # a persistent shuffled stream: 8 dev batches of 16 over 24 dev samples see every one of them
    assert set(seen_dev) == dev_ids
    assert len(method.dev_ids) == 8 and not torch.equal(method.dev_ids[0], method.dev_ids[2][:16])
    # the upper train batch is a fresh batch from a second stream, not the lower step's batch,
    # and drawing it leaves the lower stream's sequence as it is without any upper step
    assert all(not torch.equal(u, method.lower_ids[2 * i + 1]) for i, u in enumerate(method.upper_train_ids))
    no_upper = LearnedAuxWeights(lower_steps=1000)
    run(no_upper, steps=16, data=data, batch_size=16)
    assert all(torch.equal(a, b) for a, b in zip(method.lower_ids, no_upper.lower_ids))


def _scrambled_dev(data):
    gen = torch.Generator().manual_seed(99)
    dev = data.dev
    scrambled = TaskDataset(
        torch.randn(dev.inputs.shape, generator=gen, dtype=DT) * 5,
        {name: torch.roll(t, 1) for name, t in dev.targets.items()},
        dev.index,
    )
    return dataclasses.replace(data, dev=scrambled)


def test_changing_dev_inputs_and_labels_leaves_theta_trajectory_bit_identical_when_phi_is_frozen():
    data = make_data()
    other = _scrambled_dev(data)

    def frozen():  # the upper step runs (forward passes on dev, hypergradient) but φ steps by zero
        return LearnedAuxWeights(lower_steps=2, terms=2, hyper_lr=0.1, upper_optimizer="sgd", upper_lr=0.0, upper_momentum=0.0)

    res_a, rec_a, model_a = run(frozen(), steps=12, data=data, eval_every=4)
    res_b, rec_b, model_b = run(frozen(), steps=12, data=other, eval_every=4)
    assert len(rec_a.thetas) == 12
    for ta, tb in zip(rec_a.thetas, rec_b.thetas):
        assert torch.equal(ta, tb)
    assert_same_state(state(model_a), state(model_b))
    pd_cols = [c for c in res_a.history.columns if c != "seconds"]
    assert res_a.history[pd_cols].equals(res_b.history[pd_cols])

    # positive control: with φ learning, the dev data does steer θ (through φ only)
    def learning():
        return LearnedAuxWeights(lower_steps=2, terms=2, hyper_lr=0.1, upper_optimizer="sgd", upper_lr=1.0, upper_momentum=0.0)

    _, rec_c, _ = run(learning(), steps=12, data=data)
    _, rec_d, _ = run(learning(), steps=12, data=other)
    assert torch.equal(rec_c.thetas[1], rec_d.thetas[1])  # before the first upper step
    assert not torch.equal(rec_c.thetas[-1], rec_d.thetas[-1])


# --------------------------------------------------------------------------- (d) first-order lower steps


def test_lower_steps_are_first_order_and_equal_an_independent_autograd_gradient():
    method = LearnedAuxWeights(lower_steps=3, terms=3, hyper_lr=0.1, upper_optimizer="sgd", upper_lr=0.5, init=0.3)
    _, rec, model = run(method, steps=9, check_direction=True)
    assert rec.graph_grads == 0  # no .grad ever carried a graph
    assert rec.hparam_grads == 0  # the lower steps never wrote φ.grad
    assert len(rec.direction_errors) == 9
    assert max(rec.direction_errors) < 1e-12
    # after the lower steps (and the upper steps between them) no parameter keeps a .grad at all
    assert all(p.grad is None for p in model.parameters())
    assert method.rho.grad is None


def test_lower_step_does_not_move_phi():
    method = LearnedAuxWeights(lower_steps=100, terms=1, init=0.7)
    run(method, steps=6)
    assert torch.equal(method.rho.detach(), torch.full((2,), 0.7, dtype=DT))


# --------------------------------------------------------------------------- (e, f) one upper step by hand


def _one_upper_step(method, steps):
    """Run `steps` lower steps ending in one upper step; return θ and φ just before it, φ after."""
    data = make_data()
    before = {}

    class Capture(Recorder):
        def callback(self, event, info):
            if event == "upper":
                before["info"] = info

    model = make_model(0)
    rec = Capture(model, data, method, lr=0.05)
    Trainer(
        model, method, data, steps=steps, batch_size=16, optimizer=rec.optimizer, seed=0, device="cpu",
        progress=False, callbacks=[rec.callback], eval_every=steps,
    ).fit()
    return data, rec, before["info"]


def _manual_hypergrad(data, snapshot, rho0, train_ids, dev_ids, *, terms, eta, nonneg):
    model = make_model(0)
    model.load_state_dict(snapshot)
    params = tuple(p for p in model.parameters() if p.requires_grad)
    rho = rho0.clone().requires_grad_()
    x, t = data.train.gather(data.train.positions_of(train_ids))
    _, out = model(x)
    w = F.softplus(rho) if nonneg == "softplus" else rho
    inner = F.cross_entropy(out[PRIMARY], t[PRIMARY])
    for k, name in enumerate(AUX):
        inner = inner + w[k] * F.cross_entropy(out[name], t[name])
    g = torch.autograd.grad(inner, params, create_graph=True)
    xd, td = data.dev.gather(data.dev.positions_of(dev_ids))
    _, out_dev = model(xd, [PRIMARY])
    outer = F.cross_entropy(out_dev[PRIMARY], td[PRIMARY])
    (hg,) = implicit_grad(outer, g, params, (rho,), method="neumann", terms=terms, lr=eta)
    return hg, float(outer.detach())


@pytest.mark.parametrize(
    "nonneg, hyper_lr, clip, reg",
    [("softplus", 0.2, None, 0.0), ("softplus", "lower", 10.0, 0.0), ("clamp", 0.2, None, 0.0), ("softplus", 0.2, None, 0.3)],
)
def test_one_upper_step_moves_phi_exactly_as_a_manual_sgd_step_on_the_implicit_gradient(nonneg, hyper_lr, clip, reg):
    T, K, upper_lr = 4, 3, 0.7
    init = 0.5 if nonneg == "softplus" else 1e-3  # clamp: a small weight that the step pushes below 0
    method = LearnedAuxWeights(
        nonneg=nonneg, init=init, lower_steps=T, terms=K, hyper_lr=hyper_lr, hypergrad="neumann",
        upper_optimizer="sgd", upper_lr=upper_lr, upper_momentum=0.0, clip=clip, reg=reg,
    )
    data, rec, info = _one_upper_step(method, T)
    rho0 = torch.full((2,), init, dtype=DT)
    eta = 0.05 if hyper_lr == "lower" else hyper_lr  # "lower": the lower SGD's learning rate
    hg, dev_loss = _manual_hypergrad(
        data, rec.snapshot, rho0, method.upper_train_ids[0], method.dev_ids[0], terms=K, eta=eta, nonneg=nonneg
    )
    if reg:  # d/dρ of reg·Σ softplus(ρ)² = 2·reg·softplus(ρ)·sigmoid(ρ), added before clipping
        hg = hg + 2 * reg * F.softplus(rho0) * torch.sigmoid(rho0)
        assert info["regulariser"] == pytest.approx(reg * float((F.softplus(rho0) ** 2).sum()), rel=1e-12)
    norm = float(hg.norm())
    assert norm > 1e-6  # a non-trivial step
    assert info["hypergrad_norm"] == pytest.approx(norm, rel=1e-12)
    assert info["dev_loss"] == pytest.approx(dev_loss, rel=1e-12)
    scale = 1.0 if clip is None else min(1.0, clip / norm)
    expected = rho0 - upper_lr * scale * hg
    if nonneg == "clamp":
        expected = expected.clamp(min=0.0)
    torch.testing.assert_close(method.rho.detach(), expected, rtol=1e-11, atol=1e-14)
    if nonneg == "clamp":  # the projection did something here: one weight was pushed below 0
        assert (rho0 - upper_lr * hg).min() < 0 and method.rho.min() == 0


def test_phi_batches_average_the_last_product_over_that_many_train_batches_with_one_series_vector():
    """``phi_batches=3``: the hypergradient is −(1/3)·Σ_b uᵀ ∂g_b/∂ρ over the upper step's train batch and the next two
    of its stream, u = η Σ_{i≤K} (I − ηJ)^i ∇θ L_dev from the first batch's J alone. Computed here by hand: u by
    explicit Hessian-vector products, and uᵀ∂g_b/∂ρ_k = softplus'(ρ_k)·(u · ∇θ L_k(b)) since g_b = ∇θ[L_0(b) +
    Σ_k softplus(ρ_k) L_k(b)]; the three batches are distinct, so the mean differs from the first batch's term."""
    T, K, eta, upper_lr, init = 4, 2, 0.2, 0.7, 0.5
    method = LearnedAuxWeights(init=init, lower_steps=T, terms=K, hyper_lr=eta, hypergrad="neumann", upper_optimizer="sgd",
                               upper_lr=upper_lr, upper_momentum=0.0, clip=None, phi_batches=3)
    data, rec, info = _one_upper_step(method, T)
    assert len(method.upper_train_ids) == 3  # the upper step's batch, then two more for the product
    model = make_model(0)
    model.load_state_dict(rec.snapshot)
    params = tuple(p for p in model.parameters() if p.requires_grad)
    rho0 = torch.full((2,), init, dtype=DT)

    def losses(ids):
        x, t = data.train.gather(data.train.positions_of(ids))
        _, out = model(x)
        return [F.cross_entropy(out[name], t[name]) for name in (PRIMARY, *AUX)]

    first = losses(method.upper_train_ids[0])
    inner = first[0] + sum(F.softplus(rho0[k]) * first[1 + k] for k in range(2))
    g = torch.autograd.grad(inner, params, create_graph=True)
    xd, td = data.dev.gather(data.dev.positions_of(method.dev_ids[0]))
    _, out_dev = model(xd, [PRIMARY])
    v = torch.autograd.grad(F.cross_entropy(out_dev[PRIMARY], td[PRIMARY]), params, allow_unused=True, materialize_grads=True)
    term, u = list(v), list(v)
    for _ in range(K):  # term ← (I − ηJ) term; u ← u + term
        hv = torch.autograd.grad(g, params, grad_outputs=term, retain_graph=True, allow_unused=True, materialize_grads=True)
        term = [a - eta * b for a, b in zip(term, hv)]
        u = [a + b for a, b in zip(u, term)]
    u = [eta * a for a in u]
    per_batch = []
    for ids in method.upper_train_ids:
        aux = losses(ids)[1:]
        per_batch.append(torch.stack([
            torch.sigmoid(rho0[k]) * sum((a * b).sum() for a, b in zip(u, torch.autograd.grad(aux[k], params, retain_graph=True, allow_unused=True, materialize_grads=True)))
            for k in range(2)]))
    hg = -torch.stack(per_batch).mean(0)
    assert float((hg + per_batch[0]).abs().max()) > 1e-3 * float(hg.abs().max())  # the extra batches change it
    assert info["hypergrad_norm"] == pytest.approx(float(hg.norm()), rel=1e-10)
    torch.testing.assert_close(method.rho.detach(), rho0 - upper_lr * hg, rtol=1e-10, atol=1e-14)


def test_upper_step_with_zero_terms_is_the_gradient_alignment_of_dev_and_aux_gradients():
    # K = 0: dL_dev/dρ_k = -η ⟨∇θ L_dev, ∇θ L_k⟩ · softplus'(ρ_k), first-order gradients only
    T, eta, upper_lr, init = 3, 0.3, 1.0, -0.4
    method = LearnedAuxWeights(
        init=init, lower_steps=T, terms=0, hyper_lr=eta, upper_optimizer="sgd", upper_lr=upper_lr,
        upper_momentum=0.0, clip=None,
    )
    data, rec, _ = _one_upper_step(method, T)
    model = make_model(0)
    model.load_state_dict(rec.snapshot)
    params = [p for p in model.parameters() if p.requires_grad]
    x, t = data.train.gather(data.train.positions_of(method.upper_train_ids[0]))
    _, out = model(x)
    xd, td = data.dev.gather(data.dev.positions_of(method.dev_ids[0]))
    _, out_dev = model(xd)

    def flat(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])

    g_dev = flat(F.cross_entropy(out_dev[PRIMARY], td[PRIMARY]))
    align = torch.stack([g_dev @ flat(F.cross_entropy(out[name], t[name])) for name in AUX])
    hyper = -eta * align * torch.sigmoid(torch.tensor(init, dtype=DT))
    torch.testing.assert_close(method.rho.detach(), init - upper_lr * hyper, rtol=1e-11, atol=1e-14)


def test_hypergradient_is_clipped_to_the_configured_norm_keeping_its_direction():
    T, K, upper_lr, clip = 4, 3, 1.0, 1e-4
    method = LearnedAuxWeights(
        init=0.5, lower_steps=T, terms=K, hyper_lr=0.2, upper_optimizer="sgd", upper_lr=upper_lr,
        upper_momentum=0.0, clip=clip,
    )
    data, rec, info = _one_upper_step(method, T)
    rho0 = torch.full((2,), 0.5, dtype=DT)
    hg, _ = _manual_hypergrad(
        data, rec.snapshot, rho0, method.upper_train_ids[0], method.dev_ids[0], terms=K, eta=0.2, nonneg="softplus"
    )
    assert float(hg.norm()) > 100 * clip  # clipping is active
    step = rho0 - method.rho.detach()
    assert float(step.norm()) == pytest.approx(upper_lr * clip, rel=1e-9)
    torch.testing.assert_close(step / step.norm(), hg / hg.norm(), rtol=1e-9, atol=1e-12)
    assert info["hypergrad_norm"] == pytest.approx(float(hg.norm()), rel=1e-12)  # reported before clipping


@pytest.mark.parametrize("clip", [1e-4, 1e3])
def test_fixed_clip_mode_gives_every_phi_step_the_length_lr_times_clip_in_the_hypergradients_direction(clip):
    # clip_mode="fixed": the hypergradient is scaled to norm `clip` whether it is longer (1e-4: down) or
    # shorter (1e3: up); the reference is the implicit gradient computed by hand from the same snapshot
    T, K, upper_lr = 4, 3, 0.01
    method = LearnedAuxWeights(
        init=0.5, lower_steps=T, terms=K, hyper_lr=0.2, upper_optimizer="sgd", upper_lr=upper_lr,
        upper_momentum=0.0, clip=clip, clip_mode="fixed",
    )
    data, rec, info = _one_upper_step(method, T)
    rho0 = torch.full((2,), 0.5, dtype=DT)
    hg, _ = _manual_hypergrad(
        data, rec.snapshot, rho0, method.upper_train_ids[0], method.dev_ids[0], terms=K, eta=0.2, nonneg="softplus"
    )
    norm = float(hg.norm())
    assert (norm > 100 * clip) if clip < 1 else (norm < clip / 100)  # scaled down / up by more than 100×
    step = rho0 - method.rho.detach()
    assert float(step.norm()) == pytest.approx(upper_lr * clip, rel=1e-9)
    torch.testing.assert_close(step / step.norm(), hg / hg.norm(), rtol=1e-9, atol=1e-12)
    assert info["hypergrad_norm"] == pytest.approx(norm, rel=1e-12)  # reported before scaling


# --------------------------------------------------------------------------- (g) finite differences of a converged problem


class Linear(nn.Module):
    """A trainable linear backbone; with frozen linear heads every task's loss is convex in it."""

    def __init__(self, d_in: int, width: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(d_in, width)
        self.out_features = width

    def blocks(self):
        return [("layer1", self.layer1)]

    def forward(self, x):
        return self.layer1(x)


class ConvexProblem:
    """Inner: CE_label + Σ softplus(ρ_k) CE_k + ½·l2‖θ‖² over a linear trunk with fixed heads
    (strongly convex in θ); outer: CE_label on D_dev. Solved by Newton in float64."""

    l2 = 0.05

    def __init__(self):
        self.data = make_data(n=150, dev_size=30, dim=4)
        torch.manual_seed(1)
        self.model = MultiHeadModel.for_tasks(Linear(4, 3), make_tasks()).to(DT)
        for head in self.model.heads.values():
            head.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.shapes = [p.shape for p in self.params]
        self.train = self.data.train
        self.dev = self.data.dev

    def unflat(self, flat):
        out, i = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(flat[i : i + n].reshape(s))
            i += n
        return out

    def outputs(self, flat, x):
        w, b = self.unflat(flat)
        feats = x @ w.T + b
        return {name: head(feats) for name, head in self.model.heads.items()}

    def inner(self, flat, rho):
        out = self.outputs(flat, self.train.inputs)
        t = self.train.targets
        loss = F.cross_entropy(out[PRIMARY], t[PRIMARY])
        for k, name in enumerate(AUX):
            loss = loss + F.softplus(rho[k]) * F.cross_entropy(out[name], t[name])
        return loss + 0.5 * self.l2 * (flat**2).sum()

    def dev_loss(self, flat):
        return F.cross_entropy(self.outputs(flat, self.dev.inputs)[PRIMARY], self.dev.targets[PRIMARY])

    def solve(self, rho):
        flat = torch.zeros(sum(math.prod(s) for s in self.shapes), dtype=DT)
        for _ in range(50):
            grad = torch.autograd.functional.jacobian(lambda f: self.inner(f, rho), flat)
            hess = torch.autograd.functional.hessian(lambda f: self.inner(f, rho), flat)
            step = torch.linalg.solve(hess, grad)
            flat = flat - step
            if step.abs().max() < 1e-14:
                break
        return flat, hess

    def load(self, flat):
        with torch.no_grad():
            for p, v in zip(self.params, self.unflat(flat)):
                p.copy_(v)


def _central_differences(prob, rho0, h=1e-5):
    """d L_dev(θ*(ρ)) / dρ by central differences of the converged dev loss."""
    return torch.stack([(prob.dev_loss(prob.solve(rho0 + h * e)[0]) - prob.dev_loss(prob.solve(rho0 - h * e)[0])) / (2 * h)
                        for e in torch.eye(len(rho0), dtype=DT)])


def _method_at_the_optimum(prob, rho0, **kwargs):
    """A set-up LearnedAuxWeights (SGD on φ with lr 1, no momentum or clip: a step is the hypergradient) with ρ = rho0,
    the model at θ*(rho0), and an UpperContext of whole-split batches from shuffled BatchStreams (the real pipeline);
    also η = 1/λ_max(J) (η·λ_max = 1 < 2)."""
    from auxnb.methods.base import SetupInfo

    theta, hess = prob.solve(rho0)
    eta = 1.0 / float(torch.linalg.eigvalsh(hess).max())
    method = LearnedAuxWeights(init=0.0, l2=prob.l2, lower_steps=1, hyper_lr=eta, upper_optimizer="sgd", upper_lr=1.0,
                               upper_momentum=0.0, clip=None, **kwargs)
    method.setup(prob.model, SetupInfo(tasks=prob.data.tasks, device=torch.device("cpu"), num_train=len(prob.train), seed=0))
    with torch.no_grad():
        method.rho.copy_(rho0)
    prob.load(theta)
    train_stream = BatchStream(prob.train, len(prob.train), seed=5)
    dev_stream = BatchStream(prob.dev, len(prob.dev), seed=6)
    context = UpperContext(
        params=tuple(prob.params), tasks=prob.data.tasks,
        train_batch=lambda: {PRIMARY_STREAM: train_stream.next()},
        dev_batch=lambda: {PRIMARY_STREAM: dev_stream.next()},
        lr=0.1, step=1, terms=lambda b, **kw: compute_terms(prob.model, b, prob.data.tasks, **kw),
    )
    return method, context


@pytest.mark.parametrize("hypergrad, phi_batches", [("exact", 1), ("neumann", 1), ("neumann", 3)])
def test_upper_step_hypergradient_matches_finite_differences_of_the_converged_dev_loss(hypergrad, phi_batches):
    prob = ConvexProblem()
    rho0 = torch.tensor([0.3, -0.5], dtype=DT)
    fd = _central_differences(prob, rho0)
    assert float(fd.abs().max()) > 1e-3  # a non-trivial hypergradient
    method, context = _method_at_the_optimum(prob, rho0, hypergrad=hypergrad, terms=300, phi_batches=phi_batches)
    method.upper_step(prob.model, context)
    hyper = rho0 - method.rho.detach()  # SGD with lr 1: the step is the hypergradient
    torch.testing.assert_close(hyper, fd, rtol=1e-6, atol=1e-10)


def test_warm_started_series_accumulates_across_upper_steps_to_the_finite_difference_hypergradient():
    """With θ at the lower optimum and φ put back after each upper step (so J and v stay the same), ``warm_start=1``
    makes n upper steps of K = 3 terms the series of 3n terms: one step is far from central differences of the
    converged dev loss, 100 steps match them; with ``warm_start=0`` the 100th step is the first again."""
    prob = ConvexProblem()
    rho0 = torch.tensor([0.3, -0.5], dtype=DT)
    fd = _central_differences(prob, rho0)

    def hypergradients(warm_start, steps):
        method, context = _method_at_the_optimum(prob, rho0, hypergrad="neumann", terms=3, warm_start=warm_start)
        out = []
        for _ in range(steps):
            with torch.no_grad():
                method.rho.copy_(rho0)
            method.upper_step(prob.model, context)
            out.append(rho0 - method.rho.detach())  # SGD with lr 1: the step is the hypergradient
        return out

    warm = hypergradients(1.0, 100)
    cold = hypergradients(0.0, 100)
    assert float((warm[0] - fd).abs().max()) > 1e-2 * float(fd.abs().max())  # 3 terms alone are far from it
    torch.testing.assert_close(warm[-1], fd, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(cold[-1], warm[0], rtol=1e-12, atol=1e-14)  # no memory without warm_start


# --------------------------------------------------------------------------- (h) checkpoint / resume


class Interrupt(Exception):
    pass


def test_resumed_bilevel_run_ends_with_the_same_metrics_history_trace_and_phi_as_an_uninterrupted_run(tmp_path):
    def make_method():
        return LearnedAuxWeights(lower_steps=3, terms=2, hyper_lr=0.1, upper_optimizer="adam", upper_lr=0.05)

    data = make_data()
    common = dict(steps=24, batch_size=16, optimizer="adam", lr=0.01, seed=3, device="cpu", progress=False, eval_every=6)
    full_method = make_method()
    full = Trainer(make_model(0), full_method, data, **common).fit()

    evals = []

    def stop_at_third_eval(event, info):
        if event == "eval":
            evals.append(info["step"])
            if len(evals) == 3:
                raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(make_model(0), make_method(), data, checkpoint_dir=tmp_path, callbacks=[stop_at_third_eval], **common).fit()
    assert evals == [6, 12, 18] and (tmp_path / "checkpoint.pt").exists()  # the last checkpoint is at step 12

    resumed_method = make_method()
    resumed_model = make_model(0)
    resumed = Trainer(resumed_model, resumed_method, data, checkpoint_dir=tmp_path, resume=True, **common).fit()

    assert resumed.val_metric == full.val_metric and resumed.test_metric == full.test_metric
    assert resumed.best_step == full.best_step
    cols = [c for c in full.history.columns if c != "seconds"]
    assert resumed.history[cols].equals(full.history[cols])
    assert resumed.trace == full.trace
    assert torch.equal(resumed_method.rho.detach(), full_method.rho.detach())
    assert resumed_method._upper_steps == full_method._upper_steps == 8
    assert not torch.equal(full_method.rho.detach(), torch.zeros(2, dtype=DT))  # φ did learn


# --------------------------------------------------------------------------- determinism, diagnostics, errors


def test_fitting_the_same_method_twice_gives_the_same_numbers_and_steps_the_new_phi():
    method = LearnedAuxWeights(lower_steps=2, terms=2, hyper_lr=0.1, upper_optimizer="adam", upper_lr=0.05)
    data = make_data()
    first = Trainer(make_model(0), method, data, steps=8, batch_size=16, seed=0, device="cpu", progress=False).fit()
    rho_first = method.rho.detach().clone()
    second = Trainer(make_model(0), method, data, steps=8, batch_size=16, seed=0, device="cpu", progress=False).fit()
    assert torch.equal(method.rho.detach(), rho_first) and not torch.equal(rho_first, torch.zeros(2, dtype=DT))
    assert first.trace == second.trace and first.val_metric == second.val_metric


def test_check_every_records_lambda_max_and_warns_when_the_series_diverges():
    prob = ConvexProblem()
    theta, hess = prob.solve(torch.zeros(2, dtype=DT))
    lam = float(torch.linalg.eigvalsh(hess).max())
    prob.load(theta)
    from auxnb.methods.base import SetupInfo

    def step(eta):
        method = LearnedAuxWeights(l2=prob.l2, lower_steps=1, terms=3, hyper_lr=eta, check_every=1, upper_optimizer="sgd")
        method.setup(prob.model, SetupInfo(tasks=prob.data.tasks, device=torch.device("cpu"), num_train=1, seed=0))
        whole = lambda ds: (lambda: {PRIMARY_STREAM: ds.gather(torch.arange(len(ds)))})  # noqa: E731
        ctx = UpperContext(
            params=tuple(prob.params), tasks=prob.data.tasks, train_batch=whole(prob.train),
            dev_batch=whole(prob.dev), lr=0.1, step=1,
            terms=lambda b, **kw: compute_terms(prob.model, b, prob.data.tasks, **kw),
        )
        return method.upper_step(prob.model, ctx)

    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradWarning)
        info = step(1.0 / lam)
    assert info["lambda_max"] == pytest.approx(lam, rel=1e-2)
    with pytest.warns(HypergradWarning, match="diverges"):
        step(3.0 / lam)


def test_diverging_series_raises_instead_of_stepping_phi():
    method = LearnedAuxWeights(lower_steps=2, terms=150, hyper_lr=1e4, clip=None, upper_optimizer="sgd")
    with pytest.raises(FloatingPointError, match="hyper_lr"):
        run(method, steps=4)
    assert torch.equal(method.rho.detach(), torch.zeros(2, dtype=DT))


def _convex_at_solution(**method_kw):
    """The convex problem at its lower solution, λ_max of its Hessian, a set-up `LearnedAuxWeights` with
    ``hyper_lr="auto"``, and ``context(scale)``: an upper context whose training inputs are scaled by `scale`
    (J's data part grows by scale²)."""
    from auxnb.methods.base import SetupInfo

    prob = ConvexProblem()
    theta, hess = prob.solve(torch.zeros(2, dtype=DT))
    lam = float(torch.linalg.eigvalsh(hess).max())
    prob.load(theta)
    method = LearnedAuxWeights(l2=prob.l2, lower_steps=1, hyper_lr="auto", upper_optimizer="sgd", auto_tol=1e-6,
                               **method_kw)
    method.setup(prob.model, SetupInfo(tasks=prob.data.tasks, device=torch.device("cpu"), num_train=1, seed=0))

    def context(scale):
        def batch():
            x, y = prob.train.gather(torch.arange(len(prob.train)))
            return {PRIMARY_STREAM: (x * scale, y)}

        return UpperContext(
            params=tuple(prob.params), tasks=prob.data.tasks, train_batch=batch,
            dev_batch=lambda: {PRIMARY_STREAM: prob.dev.gather(torch.arange(len(prob.dev)))}, lr=0.1, step=1,
            terms=lambda b, **kw: compute_terms(prob.model, b, prob.data.tasks, **kw),
        )

    return prob, lam, method, context


def test_auto_hyper_lr_names_the_grown_curvature_when_the_series_overflows():
    """hyper_lr="auto" sets η = 1/λ_max when it estimates λ_max; when the lower problem's curvature then grows
    (here: the same convex problem with its training inputs scaled by 100, so the data part of J grows by
    10⁴) the series with η from the old estimate diverges. The error names both estimates and the fixes
    that apply to "auto" (not "lower hyper_lr", which "auto" does not take)."""
    prob, lam, method, context = _convex_at_solution(terms=400, auto_every=10, clip=None)

    info = method.upper_step(prob.model, context(1.0))  # upper step 0: λ_max estimated, a finite step
    assert info["lambda_max"] == pytest.approx(lam, rel=1e-3) and math.isfinite(info["hypergrad_norm"])
    rho = method.rho.detach().clone()
    with pytest.raises(FloatingPointError) as err:
        method.upper_step(prob.model, context(100.0))  # upper step 1: no new estimate (auto_every=10)
    message = str(err.value)
    assert "hyper_lr='auto'" in message and "auto_every" in message and "upper_lr" in message
    assert f"{lam:.4g}" in message  # the estimate η came from
    assert "lower hyper_lr" not in message
    assert torch.equal(method.rho.detach(), rho)  # φ is not stepped


def test_auto_hyper_lr_warns_once_when_the_curvature_runs_away():
    """λ_max re-estimated at every upper step: on the convex problem it stays (no warning); with the training inputs
    scaled by 100 the data part of J grows by 10⁴, past 100× the first estimate, and the step warns once, naming
    both estimates; a third such step does not warn again."""
    prob, lam, method, context = _convex_at_solution(terms=2, auto_every=1, upper_lr=0.0)

    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradWarning)
        for _ in range(2):
            assert method.upper_step(prob.model, context(1.0))["lambda_max"] == pytest.approx(lam, rel=1e-3)
    with pytest.warns(HypergradWarning, match="running away") as record:
        grown = method.upper_step(prob.model, context(100.0))["lambda_max"]
    assert grown > 100 * lam and f"{lam:.3g}" in str(record[0].message) and f"{grown:.3g}" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradWarning)
        method.upper_step(prob.model, context(100.0))  # once per run


def test_bad_constructor_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="lower_steps"):
        LearnedAuxWeights(lower_steps=0)
    with pytest.raises(ValueError, match="hyper_lr"):
        LearnedAuxWeights(hyper_lr=-1.0)
    with pytest.raises(ValueError, match="hypergrad"):
        LearnedAuxWeights(hypergrad="newton")
    with pytest.raises(ValueError, match="upper_optimizer"):
        LearnedAuxWeights(upper_optimizer="rmsprop")
    with pytest.raises(ValueError, match="clip"):
        LearnedAuxWeights(clip=0.0)


def test_loading_a_state_of_other_shapes_is_a_clear_error():
    a = LearnedAuxWeights()
    run(a, steps=2)
    saved = a.state_dict()
    saved["hparams"] = [torch.zeros(3, dtype=DT)]
    with pytest.raises(ValueError, match="same method configuration"):
        a.load_state_dict(saved)


def test_series_steps_build_the_horizon_without_moving_phi():
    """`series_step` advances the warm series and leaves φ alone: 99 of them and one `upper_step` give the 100th
    step of the warm series (K = 3: 300 terms, central differences of the converged dev loss), where one
    `upper_step` alone is far from it; it refuses a cold series."""
    prob = ConvexProblem()
    rho0 = torch.tensor([0.3, -0.5], dtype=DT)
    fd = _central_differences(prob, rho0)
    method, context = _method_at_the_optimum(prob, rho0, hypergrad="neumann", terms=3, warm_start=1.0)
    for _ in range(99):
        info = method.series_step(prob.model, context)
        assert info["series_only"] == 1.0
        assert torch.equal(method.rho.detach(), rho0)  # φ never moves, not even by rounding
    method.upper_step(prob.model, context)
    torch.testing.assert_close(rho0 - method.rho.detach(), fd, rtol=1e-6, atol=1e-10)
    fresh, context = _method_at_the_optimum(prob, rho0, hypergrad="neumann", terms=3, warm_start=1.0)
    fresh.upper_step(prob.model, context)
    assert float((rho0 - fresh.rho.detach() - fd).abs().max()) > 1e-2 * float(fd.abs().max())
    cold, context = _method_at_the_optimum(prob, rho0, hypergrad="neumann", terms=3, warm_start=0.0)
    with pytest.raises(ValueError, match="warm_start > 0"):
        cold.series_step(prob.model, context)
