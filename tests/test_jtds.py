"""JTDS and N-JTDS against independent truth: the schedule formula by hand, per-sample gradients,
finite differences of a closed-form weighted least-squares bilevel problem, and label-noise detection."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from auxnb import methods
from auxnb.data import SyntheticSource
from auxnb.hypergrad import HypergradWarning, implicit_grad
from auxnb.methods import JTDS, NJTDS, SetupInfo
from auxnb.methods.base import LossTerms, compute_terms
from auxnb.methods.jtds import VARIANTS, zscore
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import INDEX_KEY, MISSING_CLASS, Task, TaskSet
from auxnb.methods.bilevel import rng_snapshot
from auxnb.train import Trainer, UpperContext


# ----------------------------------------------------------------------------- helpers
class _Features(nn.Module):
    """Stands in for a model: JTDS only asks it for the feature size."""

    def __init__(self, d: int):
        super().__init__()
        self.out_features = d


def _info(tasks, extra=None, seed=0):
    return SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=10, seed=seed,
                     generator=torch.Generator().manual_seed(seed), extra=extra or {})


def _softplus(x):
    return np.log1p(np.exp(x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _zscore_np(l, m, eps=1e-6):
    out = np.zeros_like(l)
    if m.any():
        mu = l[m].mean()
        sd = np.sqrt(((l[m] - mu) ** 2).mean())  # population std
        out[m] = (l[m] - mu) / (sd + eps)
    return out


def _set_phi(method, rng):
    """Non-trivial φ (negative and positive slopes, offsets) so every factor matters."""
    with torch.no_grad():
        method.alpha.copy_(torch.as_tensor(rng.uniform(-1, 1.5, method.alpha.shape)))
        if method.prototypes is not None:
            method.prototypes.copy_(torch.as_tensor(rng.normal(0, 0.7, method.prototypes.shape)))
        if method.filter_a is not None:
            method.filter_a.copy_(torch.as_tensor(rng.uniform(-2, 2, method.filter_a.shape)))
            method.filter_b.copy_(torch.as_tensor(rng.uniform(-0.5, 0.5, method.filter_b.shape)))


def _expected(method, loss, mask, feats, cols, primary=0):
    """The JTDS Eq. 4 schedule of one stream computed by hand in numpy (float64).

    With a normalisation (not the paper's ``"none"``) the task factor is relative too:
    σ1(α_k)/σ1(α_primary), `primary` being the primary task's position in the method's task order
    (0 in these tests: the primary task comes first in each TaskSet); with ``pin_primary`` (the default)
    σ1(α_k)/σ1(1) for the auxiliary tasks and 1 for the primary, α_G left at its initial value 1."""
    alpha_all = method.alpha.detach().double().numpy()
    alpha = alpha_all[cols]
    w = np.broadcast_to(_softplus(alpha), loss.shape).copy()
    if method.normalize != "none" and method.pin_primary:
        w = w / _softplus(1.0)
        w[:, np.asarray(cols) == primary] = 1.0
    elif method.normalize != "none":
        w = w / _softplus(alpha_all[primary])
    sample = np.ones_like(loss)
    if method.uses_feature:
        proto = method.prototypes.detach().double().numpy()[cols]
        if method.feature_norm == "l2":
            feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        sample = sample * _softplus(feats @ proto.T)
    if method.uses_loss:
        a = method.filter_a.detach().double().numpy()[cols]
        b = method.filter_b.detach().double().numpy()[cols]
        lhat = np.stack([_zscore_np(loss[:, j], mask[:, j]) for j in range(loss.shape[1])], 1)
        sample = sample * _sigmoid(a * lhat + b)
    if method.normalize == "batch_mean" and (method.uses_feature or method.uses_loss):
        means = np.array([sample[mask[:, j], j].mean() for j in range(loss.shape[1])])
        sample = sample / means
    return w * sample


# ----------------------------------------------------------------------------- the schedule
def test_zscore_uses_population_std_excludes_missing_labels_and_is_zero_for_a_batch_of_one():
    l = torch.tensor([[1.0, 4.0], [2.0, 0.0], [6.0, 9.0]])
    m = torch.tensor([[True, True], [True, False], [True, True]])
    got = zscore(l, m).numpy()
    for j in range(2):
        assert np.allclose(got[:, j], _zscore_np(l[:, j].numpy(), m[:, j].numpy()), atol=1e-6)
    assert got[1, 1] == 0.0  # a missing label: no z-score, no part in the other samples' statistics
    one = zscore(torch.tensor([[3.0]]), torch.tensor([[True]]))
    assert torch.isfinite(one).all() and one.item() == 0.0


TASKS_TWO_STREAMS = TaskSet([
    Task("main", "classification", 3, primary=True),
    Task("attr", "binary"),
    Task("rot", "classification", 4, stream="rot"),
])


def _hand_terms(rng, b_primary=5, b_rot=7, d=3):
    loss_main = rng.uniform(0.1, 3.0, b_primary)
    mask_main = np.ones(b_primary, dtype=bool)
    mask_main[1] = False  # a missing primary label (semi-supervised): its loss is exactly 0
    loss_main[~mask_main] = 0.0
    loss_attr = rng.uniform(0.1, 2.0, b_primary)
    loss_rot = rng.uniform(0.1, 2.0, b_rot)
    feats = {"primary": rng.normal(size=(b_primary, d)), "rot": rng.normal(size=(b_rot, d))}
    terms = LossTerms(
        tasks=TASKS_TWO_STREAMS,
        losses={"main": torch.tensor(loss_main), "attr": torch.tensor(loss_attr), "rot": torch.tensor(loss_rot)},
        masks={"main": torch.tensor(mask_main), "attr": torch.ones(b_primary, dtype=torch.bool),
               "rot": torch.ones(b_rot, dtype=torch.bool)},
        outputs={}, features={k: torch.tensor(v) for k, v in feats.items()}, targets={},
    )
    return terms, feats


@pytest.mark.parametrize("normalize", ["none", "batch_mean"])
@pytest.mark.parametrize("variant", [v for v in VARIANTS])
def test_schedule_equals_the_hand_computed_formula_for_each_ablation(variant, normalize):
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(3)
        method = JTDS(variant, normalize=normalize)
        method.setup(_Features(3), _info(TASKS_TWO_STREAMS))
        _set_phi(method, rng)
        terms, feats = _hand_terms(rng)
        got = {k: v.detach().numpy() for k, v in method.schedule(terms).items()}
    finally:
        torch.set_default_dtype(torch.float32)
    if variant == "no-aux":
        assert sorted(got) == ["main"] and method.task_names(TASKS_TWO_STREAMS) == ["main"]
        loss = terms.losses["main"].numpy()[:, None]
        mask = terms.masks["main"].numpy()[:, None]
        assert np.allclose(got["main"], _expected(method, loss, mask, feats["primary"], [0])[:, 0], rtol=1e-10)
        return
    loss = torch.stack([terms.losses["main"], terms.losses["attr"]], 1).numpy()
    mask = torch.stack([terms.masks["main"], terms.masks["attr"]], 1).numpy()
    exp = _expected(method, loss, mask, feats["primary"], [0, 1])
    assert np.allclose(got["main"], exp[:, 0], rtol=1e-10) and np.allclose(got["attr"], exp[:, 1], rtol=1e-10)
    exp_rot = _expected(method, terms.losses["rot"].numpy()[:, None], np.ones((7, 1), bool), feats["rot"], [2])
    assert np.allclose(got["rot"], exp_rot[:, 0], rtol=1e-10)
    if variant == "only-task":  # one common weight per task
        assert np.allclose(got["attr"], got["attr"][0])


@pytest.mark.parametrize("variant", ["full", "no-loss"])
def test_schedule_with_the_l2_feature_is_unchanged_when_the_feature_is_multiplied_by_a_constant(variant):
    rng = np.random.default_rng(11)
    method = JTDS.bounded(variant, fallback=None)
    assert method.feature_norm == "l2"  # issue 22's scale-free score
    method.setup(_Features(3), _info(TASKS_TWO_STREAMS))
    _set_phi(method, rng)
    terms, _ = _hand_terms(rng)
    before = {k: v.detach().clone() for k, v in method.schedule(terms).items()}
    for scale in (1e-3, 37.0, 1e4):
        scaled = LossTerms(tasks=terms.tasks, losses=terms.losses, masks=terms.masks, outputs={},
                           features={k: v * scale for k, v in terms.features.items()}, targets={})
        after = method.schedule(scaled)
        for k in before:
            assert torch.allclose(after[k], before[k], rtol=1e-5, atol=1e-7), (scale, k)
    # the raw feature (the paper's) is not scale-free: the same φ gives other weights at 37·c
    raw = JTDS(variant, fallback=None, feature_norm="none")
    raw.setup(_Features(3), _info(TASKS_TWO_STREAMS))
    _set_phi(raw, np.random.default_rng(11))
    scaled = LossTerms(tasks=terms.tasks, losses=terms.losses, masks=terms.masks, outputs={},
                       features={k: v * 37.0 for k, v in terms.features.items()}, targets={})
    assert not torch.allclose(raw.schedule(scaled)["main"], raw.schedule(terms)["main"], rtol=1e-3)


def test_effective_sample_size_and_weight_auc_match_hand_computed_cases():
    from auxnb.methods.jtds import effective_sample_size, weight_auc

    w = torch.tensor([[1.0, 4.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert effective_sample_size(w).tolist() == pytest.approx([1.0, 0.25])  # equal weights; one holds all
    mask = torch.tensor([[True, True], [True, True], [False, False], [False, False]])
    # column 1 over two samples (4, 0): (4)²/(2·16) = 0.5
    assert effective_sample_size(w, mask).tolist() == pytest.approx([1.0, 0.5])
    # 2 clean × 2 corrupted pairs: clean wins 3, ties 1 -> (3 + 0.5)/4
    assert weight_auc([0.9, 0.5, 0.1, 0.5], [False, False, True, True]) == pytest.approx(0.875)
    assert weight_auc([0.1, 0.2, 0.9], [False, False, True]) == 0.0
    assert math.isnan(weight_auc([0.1, 0.2], [False, False]))


class _WideNonNegative(nn.Module):
    """A 1568-d non-negative feature with ‖c‖₁ ≈ 1000, as Fashion-MNIST's ConvNet4 gives JTDS."""

    def __init__(self, d_in: int, d: int = 1568, l1: float = 1000.0):
        super().__init__()
        self.out_features = d
        self.linear = nn.Linear(d_in, d)
        with torch.no_grad():
            probe = torch.relu(self.linear(torch.randn(512, d_in)))
            self.scale = l1 / float(probe.sum(1).mean())

    def forward(self, x):
        return torch.relu(self.linear(x)) * self.scale


def _wide_run(method, seed=0):
    src = SyntheticSource(n=600, dim=8, num_classes=4, aux="helpful", noise=0.1, seed=seed)
    bundle = src.bundle(val_size=0.2, test_size=0.2, dev_size=40, label_noise=0.4, seed=seed)
    torch.manual_seed(seed)
    backbone = _WideNonNegative(8)
    model = MultiHeadModel.for_tasks(backbone, src.tasks())
    m = method.lower_steps
    first = (getattr(method, "warmup", 0) // m + 1) * m  # the lower step of the first upper step that moves φ
    steps = first + 1  # the last lower batch is weighted by φ after exactly one φ update
    updates = []
    result = Trainer(model, method, bundle, steps=steps, eval_every=steps, batch_size=64, optimizer="adam", lr=1e-3,
                     seed=seed, device="cpu", progress=False,
                     callbacks=[lambda event, info: updates.append(info) if event == "upper" and "warmup" not in info else None]).fit()
    assert len(updates) == 1  # exactly one φ update before the last batch
    return result, backbone


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_jtds_keeps_the_effective_sample_size_after_its_first_upper_step_on_a_wide_feature(seed):
    """The issue-22 collapse: a 1568-d non-negative feature with ‖c‖₁ ≈ 1000 (Fashion-MNIST's) and
    Adam 0.1 on the raw prototype score gave (Σw)²/(BΣw²) of 0.35–0.42 in the first epoch. With
    the constructor's defaults (issue 22's recommendation, `JTDS.bounded`) the first φ update must
    leave it ≥ 0.9."""
    result, backbone = _wide_run(JTDS(fallback=None), seed)
    with torch.no_grad():  # the precondition: the feature is the wide, large-norm one
        l1 = float(backbone(torch.randn(256, 8)).sum(1).mean())
    assert 700 < l1 < 1400
    ess = result.trace[-1]["batch_ess"][0]
    assert ess >= 0.9, ess


def test_the_raw_feature_with_adam_collapses_the_weights_on_a_wide_feature():
    """The same run with the constructor's defaults before issue 22 (`JTDS.issue8`: raw feature, Adam 0.1):
    the collapse the test above guards against is real, so that test has the power to see it."""
    result, _ = _wide_run(JTDS.issue8(fallback=None), 0)
    assert result.trace[-1]["batch_ess"][0] < 0.9


def test_warmup_leaves_phi_unchanged_until_the_given_lower_step():
    method = JTDS(fallback=None, lower_steps=2, warmup=4)
    src = SyntheticSource(n=300, dim=8, num_classes=4, aux="helpful", noise=0.1, seed=0)
    bundle = src.bundle(val_size=0.2, test_size=0.2, dev_size=20, label_noise=0.4, seed=0)
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(MLP(8, hidden=(16,)), src.tasks())
    seen = []

    def watch(event, info):
        if event == "upper":
            seen.append((info["step"], "warmup" in info, [p.detach().clone() for p in method.hparams()]))

    Trainer(model, method, bundle, steps=8, batch_size=32, seed=0, device="cpu", progress=False, callbacks=[watch]).fit()
    assert [(s, w) for s, w, _ in seen] == [(2, True), (4, True), (6, False), (8, False)]
    first = seen[0][2]
    assert all(torch.equal(a, b) for a, b in zip(first, seen[1][2]))  # still the initial φ at step 4
    assert not all(torch.equal(a, b) for a, b in zip(first, seen[2][2]))  # the step-6 update moved it


def test_warmup_series_builds_the_series_without_moving_phi_or_theta():
    """`warmup_series`: the warm-up's upper slots solve and keep the series (series_step) but leave φ at its start
    and θ's training bit for bit as a warm-up that computes nothing; a cold series has nothing to keep (refused)."""
    src = SyntheticSource(n=300, dim=8, num_classes=4, aux="helpful", noise=0.1, seed=0)
    bundle = src.bundle(val_size=0.2, test_size=0.2, dev_size=20, label_noise=0.4, seed=0)

    def fit(**kwargs):
        method = JTDS(lower_steps=2, warmup=4, **kwargs)
        torch.manual_seed(0)
        model = MultiHeadModel.for_tasks(MLP(8, hidden=(16,)), src.tasks())
        seen = []

        def watch(event, info):
            if event == "upper":
                seen.append(dict(info))

        Trainer(model, method, bundle, steps=4, batch_size=32, seed=0, device="cpu", progress=False,
                callbacks=[watch]).fit()
        return method, model, seen

    plain, plain_model, plain_seen = fit()
    kept, kept_model, kept_seen = fit(warmup_series=True)
    assert [("warmup" in i, "series_only" in i) for i in plain_seen] == [(True, False)] * 2
    assert [("warmup" in i, "series_only" in i, "dev_loss" in i) for i in kept_seen] == [(True, True, True)] * 2
    assert plain._series is None and kept._series is not None
    assert all(torch.isfinite(t).all() for t in kept._series) and any(bool(t.abs().sum() > 0) for t in kept._series)
    for a, b in zip(plain.hparams(), kept.hparams()):
        assert torch.equal(a, b)  # φ is still its (seeded) start in both
    for (name, a), b in zip(plain_model.state_dict().items(), kept_model.state_dict().values()):
        assert torch.equal(a, b), name  # θ trained the same: the upper level draws from its own streams
    with pytest.raises(ValueError, match="warm_start is 0"):
        JTDS(warmup_series=True, warm_start=0.0)
    with pytest.raises(TypeError, match="warmup_series"):
        JTDS(warmup_series=1)


def test_schedule_of_a_batch_of_one_is_finite_and_uses_a_zero_normalised_loss():
    tasks = TaskSet([Task("main", "classification", 3, primary=True)])
    method = JTDS.paper()  # the paper's unnormalised schedule (the default's batch_mean makes w ≡ 1 here)
    method.setup(_Features(2), _info(tasks))
    terms = LossTerms(tasks, {"main": torch.tensor([2.5])}, {"main": torch.tensor([True])}, {},
                      {"primary": torch.tensor([[0.3, -1.0]])}, {})
    (w,) = method.schedule(terms).values()
    p = method.prototypes.detach()[0]
    expected = (torch.nn.functional.softplus(method.alpha.detach()[0])
                * torch.nn.functional.softplus(p @ torch.tensor([0.3, -1.0]))
                * torch.sigmoid(method.filter_b.detach()[0]))
    assert torch.isfinite(w).all() and torch.allclose(w, expected.reshape(1))


def test_schedule_for_many_binary_tasks_on_one_stream_equals_the_per_task_formula():
    # CUB-like: one primary and 60 binary attribute tasks on the same images, computed in one batched
    # expression by the method; the reference is a per-task loop in numpy.
    k_aux, b, d = 60, 6, 4
    tasks = TaskSet([Task("species", "classification", 5, primary=True)]
                    + [Task(f"attr{j}", "binary") for j in range(k_aux)])
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(0)
        method = JTDS.paper()  # the paper's schedule (normalize="none")
        method.setup(_Features(d), _info(tasks))
        _set_phi(method, rng)
        loss = rng.uniform(0, 2, (b, k_aux + 1))
        mask = rng.uniform(size=(b, k_aux + 1)) > 0.2
        loss[~mask] = 0
        feats = rng.normal(size=(b, d))
        terms = LossTerms(tasks, {t.name: torch.tensor(loss[:, j]) for j, t in enumerate(tasks)},
                          {t.name: torch.tensor(mask[:, j]) for j, t in enumerate(tasks)}, {},
                          {"primary": torch.tensor(feats)}, {})
        got = method.schedule(terms)
    finally:
        torch.set_default_dtype(torch.float32)
    for j, t in enumerate(tasks):
        exp = _expected(method, loss[:, [j]], mask[:, [j]], feats, [j])[:, 0]
        assert np.allclose(got[t.name].detach().numpy(), exp, rtol=1e-10), t.name
    # φ is O(d·(n+1)): α, P, a, b
    assert sum(p.numel() for p in method.hparams()) == (k_aux + 1) * (d + 3)


# ----------------------------------------------------------------------------- the lower step
def _real_batch():
    torch.manual_seed(0)
    tasks = TaskSet([
        Task("main", "classification", 3, primary=True),
        Task("attr", "binary"),
        Task("rot", "classification", 4, stream="rot"),
    ])
    model = MultiHeadModel.for_tasks(MLP(4, hidden=(5,)), tasks)
    x = torch.randn(4, 4)
    main = torch.tensor([0, MISSING_CLASS, 2, 1])
    attr = torch.tensor([1.0, 0.0, float("nan"), 1.0])
    ids = torch.tensor([7, 3, 9, 0])
    x_rot = torch.cat([x.flip(1), -x])  # two "rotated" copies of each sample, sharing its id
    batch = {
        "primary": (x, {"main": main, "attr": attr, INDEX_KEY: ids}),
        "rot": (x_rot, {"rot": torch.tensor([0, 1, 2, 3, 1, 2, 3, 0]), INDEX_KEY: ids.repeat(2)}),
    }
    return tasks, model, batch


@pytest.mark.parametrize("name", ["jtds", "n-jtds"])
def test_lower_direction_is_the_weighted_sum_of_per_sample_gradients_with_weights_detached(name):
    tasks, model, batch = _real_batch()
    kwargs = {"num_ids": 10} if name == "n-jtds" else {}
    method = methods.get(name, **kwargs)
    method.setup(model, _info(tasks, {"bundle_info": {"sizes": {"views": ["rot"]}}}))
    rng = np.random.default_rng(1)
    with torch.no_grad():
        if name == "jtds":
            for p in method.hparams():
                p.copy_(torch.as_tensor(rng.normal(0, 0.5, p.shape), dtype=p.dtype))
        else:
            for p in method.hparams():
                p.copy_(torch.as_tensor(rng.normal(0, 1.0, p.shape), dtype=p.dtype))
    params = [p for p in model.parameters()]
    terms = compute_terms(model, batch, tasks)
    weights = {k: v.detach() for k, v in method.schedule(terms).items()}
    direction = method.direction(terms, params)
    assert all(not g.requires_grad for g in direction)  # first-order: no graph
    assert all(h.grad is None for h in method.hparams())
    # by hand: Σ_k (1/n_k) Σ_{i labelled} w_ik ∇l_ik, one autograd call per (sample, task)
    terms = compute_terms(model, batch, tasks)
    expected = [torch.zeros_like(p) for p in params]
    for k in ("main", "attr", "rot"):
        labelled = terms.masks[k].nonzero().flatten().tolist()
        for i in labelled:
            grads = torch.autograd.grad(terms.losses[k][i], params, retain_graph=True, allow_unused=True)
            for e, g in zip(expected, grads):
                if g is not None:
                    e += weights[k][i] * g / len(labelled)
    for got, exp in zip(direction, expected):
        assert torch.allclose(got, exp, atol=1e-6, rtol=1e-5)


def test_njtds_weight_is_softplus_of_the_table_row_of_the_sample_id_shared_by_rotated_copies():
    tasks, model, batch = _real_batch()
    method = NJTDS(num_ids={"primary": 10, "rot": 10})
    method.setup(model, _info(tasks, {"bundle_info": {"sizes": {"views": ["rot"]}}}))
    with torch.no_grad():
        for p in method.hparams():
            p.copy_(torch.randn(p.shape))
    terms = compute_terms(model, batch, tasks)
    w = method.schedule(terms)
    prim, rot = method.hparams()
    ids = batch["primary"][1][INDEX_KEY]
    sp = torch.nn.functional.softplus
    assert torch.allclose(w["main"], sp(prim[ids, 0])) and torch.allclose(w["attr"], sp(prim[ids, 1]))
    assert torch.allclose(w["rot"], sp(rot[ids.repeat(2), 0]))
    assert torch.equal(w["rot"][:4], w["rot"][4:])  # the two copies of a sample share its weight
    assert NJTDS(init_weight=0.7).init_weight == 0.7
    fresh = NJTDS(init_weight=0.7, num_ids=10)
    fresh.setup(model, _info(tasks))
    assert all(torch.allclose(sp(t), torch.tensor(0.7)) for t in fresh.hparams())


def test_njtds_errors_name_the_missing_ids_and_the_fix():
    tasks, model, batch = _real_batch()
    with pytest.raises(ValueError, match="num_ids"):
        NJTDS().setup(model, _info(tasks))
    method = NJTDS(num_ids=5)
    method.setup(model, _info(tasks))
    with pytest.raises(IndexError, match="num_ids"):
        method.schedule(compute_terms(model, batch, tasks))  # id 9 >= 5
    terms = compute_terms(model, batch, tasks)
    terms.index = {}
    with pytest.raises(KeyError, match="sample ids"):
        method.schedule(terms)


# ----------------------------------------------------------------------------- the hypergradient
def _wls_problem(rng, n=8, d=3, m=5):
    """θ = β shared by a primary and an auxiliary regression task: l_ik = (x_iᵀβ − y_ik)².

    With the scheduler's inputs (features c_i = x_i, normalised losses l̂) held fixed, the lower
    problem is weighted least squares, so θ*(φ) and the dev loss have a closed form; the implicit
    gradient that JTDS computes (features and losses detached) is the derivative of exactly that.
    """
    x = rng.normal(size=(n, d))
    y = np.stack([x @ rng.normal(size=d) + 0.5 * rng.normal(size=n), rng.normal(size=n)], 1)
    xd = rng.normal(size=(m, d))
    yd = xd @ rng.normal(size=d)
    return torch.tensor(x), torch.tensor(y), torch.tensor(xd), torch.tensor(yd)


_REG_TASKS = TaskSet([Task("main", "regression", primary=True), Task("aux", "regression")])


def _terms_at(beta, x, y):
    pred = x @ beta
    losses = {"main": (pred - y[:, 0]) ** 2, "aux": (pred - y[:, 1]) ** 2}
    n = len(x)
    return LossTerms(_REG_TASKS, losses, {k: torch.ones(n, dtype=torch.bool) for k in losses}, {},
                     {"primary": x}, {}, index={"primary": torch.arange(n)})


def _wls(method, frozen_terms, x, y):
    """argmin_β Σ_k mean_i w_ik (x_iᵀβ − y_ik)² for the weights at `frozen_terms`."""
    w = method.schedule(frozen_terms)
    n = len(x)
    a = sum((w[k][:, None, None] * x[:, :, None] * x[:, None, :]).sum(0) / n for k in ("main", "aux"))
    r = sum((w[k][:, None] * y[:, j, None] * x).sum(0) / n for j, k in enumerate(("main", "aux")))
    return torch.linalg.solve(a, r)


@pytest.mark.parametrize("name", ["jtds", "n-jtds"])
def test_hypergradient_matches_finite_differences_of_the_weighted_least_squares_solution(name):
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(5)
        x, y, xd, yd = _wls_problem(rng)
        method = JTDS() if name == "jtds" else NJTDS(num_ids=len(x))
        method.setup(_Features(x.shape[1]), _info(_REG_TASKS))
        with torch.no_grad():
            if name == "jtds":
                _set_phi(method, rng)
            else:
                for p in method.hparams():
                    p.copy_(torch.as_tensor(rng.normal(0, 1, p.shape)))
        # the self-consistent lower solution: β* solves the WLS problem whose weights read the losses at β*
        beta = torch.zeros(x.shape[1])
        for _ in range(200):
            new = _wls(method, _terms_at(beta, x, y), x, y).detach()
            if torch.norm(new - beta) < 1e-13:
                break
            beta = new
        assert torch.norm(new - beta) < 1e-12
        frozen = _terms_at(beta, x, y)
        dev = lambda b: ((xd @ b - yd) ** 2).mean()  # noqa: E731

        # finite differences of dev(θ*(φ)) with the scheduler's inputs frozen at β*
        hparams = method.hparams()
        fd = []
        eps = 1e-6
        for h in hparams:
            g = torch.zeros_like(h)
            flat = h.data.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + eps
                up = dev(_wls(method, frozen, x, y)).item()
                flat[j] = old - eps
                down = dev(_wls(method, frozen, x, y)).item()
                flat[j] = old
                g.view(-1)[j] = (up - down) / (2 * eps)
            fd.append(g)
        fd_flat = torch.cat([g.reshape(-1) for g in fd])

        theta = beta.clone().requires_grad_(True)

        def hyper(method_name, terms=3, lr=1.0):
            inner = method.direction(_terms_at(theta, x, y), (theta,), create_graph=True)
            hg = implicit_grad(dev(theta), inner, (theta,), hparams, method=method_name, terms=terms, lr=lr)
            return torch.cat([g.reshape(-1) for g in hg])

        exact = hyper("exact")
        assert torch.allclose(exact, fd_flat, rtol=1e-6, atol=1e-9)

        # Neumann with K = 3 terms and step η: the error is Bᵀ(I − ηJ)^{K+1} J⁻¹ v (B = ∂g/∂φ, v = ∂dev/∂θ,
        # J symmetric here), bounded by ‖B‖₂ · ρ^{K+1} · ‖J⁻¹‖₂ · ‖v‖ with ρ = max |1 − ηλ_i(J)|.
        inner = method.direction(_terms_at(theta, x, y), (theta,), create_graph=True)[0]
        jac = torch.stack([torch.autograd.grad(inner[i], theta, retain_graph=True)[0] for i in range(len(inner))])
        bmat = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(inner[i], hparams, retain_graph=True)])
                            for i in range(len(inner))])
        v = torch.autograd.grad(dev(theta), theta)[0]
        lam = torch.linalg.eigvalsh(jac)
        eta = 1.0 / lam.max().item()
        rho = (1 - eta * lam).abs().max().item()
        bound = torch.linalg.matrix_norm(bmat, 2).item() * rho ** 4 / lam.min().item() * v.norm().item()
        neumann = hyper("neumann", terms=3, lr=eta)
        assert (neumann - fd_flat).norm().item() <= bound + 1e-9
        assert bound < fd_flat.norm().item()  # the bound is informative, not vacuous
        # and the series converges to the finite differences as K grows
        assert torch.allclose(hyper("neumann", terms=400, lr=eta), fd_flat, rtol=1e-5, atol=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


class _DropoutNet(nn.Module):
    """A backbone with BatchNorm and dropout, so that a second forward pass must redraw the same masks."""

    out_features = 6

    def __init__(self):
        super().__init__()
        self.lin1, self.bn, self.drop, self.lin2 = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 6)

    def forward(self, x):
        return torch.relu(self.lin2(self.drop(torch.relu(self.bn(self.lin1(x))))))


def _upper_setup(name, forward_mode=True):
    tasks, _, batch = _real_batch()
    torch.manual_seed(3)
    model = MultiHeadModel.for_tasks(_DropoutNet(), tasks).double()
    batch = {k: (x.double(), {t: (v.double() if v.is_floating_point() else v) for t, v in tgt.items()})
             for k, (x, tgt) in batch.items()}
    kwargs = {"num_ids": 10} if name == "n-jtds" else {"warmup": 0}
    method = methods.get(name, forward_mode=forward_mode, **kwargs)
    method.setup(model, _info(tasks, {"bundle_info": {"sizes": {"views": ["rot"]}}}))
    rng = np.random.default_rng(4)
    with torch.no_grad():
        for p in method.hparams():
            p.copy_(torch.as_tensor(rng.normal(0, 0.6, p.shape), dtype=p.dtype))
    params = tuple(model.parameters())
    context = UpperContext(params=params, tasks=tasks, train_batch=lambda: batch,
                           dev_batch=lambda: {"primary": batch["primary"]}, lr=0.1, step=1,
                           terms=lambda b, **kw: compute_terms(model, b, tasks, **kw))
    return tasks, model, batch, method, params, context


@pytest.mark.parametrize("name", ["jtds", "n-jtds"])
def test_forward_mode_product_equals_finite_differences_of_the_lower_direction_in_phi(name):
    """uᵀ∂g/∂φ by one forward-mode pass (`hparam_product`) against central differences of uᵀg(φ)
    (float64; the same dropout masks in every forward pass), and the global random state untouched."""
    torch.set_default_dtype(torch.float64)
    try:
        tasks, model, batch, method, params, context = _upper_setup(name)
        model.train()
        state = rng_snapshot(None)
        terms = compute_terms(model, batch, tasks)
        gen = torch.Generator().manual_seed(11)
        u = tuple(torch.randn(p.shape, generator=gen) for p in params)
        product = method.hparam_product(model, context, batch, terms, params, state)
        after_snapshot = torch.get_rng_state()
        got = product(u)
        assert torch.equal(torch.get_rng_state(), after_snapshot)  # the pass leaves the global random state

        def u_dot_g():
            torch.set_rng_state(state[0])  # the masks of the first forward pass
            g = method.direction(compute_terms(model, batch, tasks), params)
            return sum(float((a * b).sum()) for a, b in zip(u, g))

        eps = 1e-6
        for h, gh in zip(method.hparams(), got):
            fd = torch.zeros_like(h)
            flat = h.data.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + eps
                up = u_dot_g()
                flat[j] = old - eps
                down = u_dot_g()
                flat[j] = old
                fd.view(-1)[j] = (up - down) / (2 * eps)
            assert float(fd.abs().max()) > 1e-4  # every part of φ matters here
            torch.testing.assert_close(gh, fd, rtol=1e-6, atol=1e-9)
        # the masks matter: drawn afresh, the same product is another number
        fresh = method.hparam_product(model, context, batch, terms, params, None)(u)
        assert max(float((a - b).abs().max()) for a, b in zip(fresh, got)) > 1e-3
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name, phi_batches", [("jtds", 1), ("n-jtds", 1), ("jtds", 3)])
def test_upper_step_in_forward_mode_moves_phi_as_the_double_backward_and_leaves_buffers_and_rng(name, phi_batches):
    """With ``phi_batches=3`` each of the three batches' products (forward mode, or a VJP through that batch's g)
    reads the dropout masks of its own forward pass; the two ways agree there too."""
    torch.set_default_dtype(torch.float64)
    try:
        out = {}
        for forward_mode in (False, True):
            _, model, _, method, params, context = _upper_setup(name, forward_mode)
            method.upper = method.upper.replace(phi_batches=phi_batches)
            model.train()
            buffers = [b.clone() for b in model.buffers()]
            theta = [p.detach().clone() for p in params]
            torch.manual_seed(5)
            method.upper_step(model, context)
            out[forward_mode] = ([h.detach().clone() for h in method.hparams()], torch.get_rng_state())
            assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
            assert all(torch.equal(a, p) for a, p in zip(theta, params))
        moved = [(a - b.detach()).abs().max() for a, b in zip(out[True][0], _upper_setup(name)[3].hparams())]
        assert max(float(m) for m in moved) > 1e-4  # φ moved
        for a, b in zip(out[True][0], out[False][0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert torch.equal(out[True][1], out[False][1])  # the same random numbers drawn
    finally:
        torch.set_default_dtype(torch.float32)


def test_forward_mode_falls_back_to_the_double_backward_once_for_an_op_without_a_forward_derivative():
    class _NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    class _Net(_DropoutNet):
        def forward(self, x):
            return _NoJvp.apply(super().forward(x))

    torch.set_default_dtype(torch.float64)
    try:
        tasks, _, batch = _real_batch()
        torch.manual_seed(3)
        model = MultiHeadModel.for_tasks(_Net(), tasks).double()
        method = JTDS(warmup=0)
        method.setup(model, _info(tasks, {"bundle_info": {"sizes": {"views": ["rot"]}}}))
        params = tuple(model.parameters())
        context = UpperContext(params=params, tasks=tasks, train_batch=lambda: batch,
                               dev_batch=lambda: {"primary": batch["primary"]}, lr=0.1, step=1,
                               terms=lambda b, **kw: compute_terms(model, b, tasks, **kw))
        batch = {k: (x.double(), tgt) for k, (x, tgt) in batch.items()}
        with pytest.warns(HypergradWarning, match="no forward-mode derivative"):
            method.upper_step(model, context)
        assert method._forward_failed
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            method.upper_step(model, context)  # no second attempt, no second warning
        assert math.isfinite(method.last_upper["hypergrad_norm"]) and method.last_upper["hypergrad_norm"] > 0
    finally:
        torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- trace
def test_trace_records_the_last_weight_of_each_probe_with_its_corruption_flag():
    tasks = TaskSet([Task("main", "classification", 3, primary=True), Task("rot", "classification", 4, stream="rot")])
    corrupted = torch.zeros(12, dtype=torch.bool)
    corrupted[[2, 9]] = True
    method = NJTDS(num_ids=12, probe_size=3)
    method.setup(_Features(2), _info(tasks, {"bundle_info": {"corrupted": corrupted, "sizes": {"views": ["rot"]}}}))
    with torch.no_grad():
        for p in method.hparams():
            p.copy_(torch.randn(p.shape))
    theta = torch.ones(1, requires_grad=True)

    def step(ids):
        n = len(ids)
        ids = torch.tensor(ids)
        terms = LossTerms(tasks, {"main": theta * torch.ones(n), "rot": theta * torch.ones(2 * n)},
                          {"main": torch.ones(n, dtype=torch.bool), "rot": torch.ones(2 * n, dtype=torch.bool)},
                          {}, {}, {}, index={"primary": ids, "rot": ids.repeat(2)})
        method.direction(terms, [theta])

    step([5, 2, 7, 9])
    step([2, 11, 5, 1])
    trace = method.trace()
    assert trace["probe_ids"].tolist() == [5, 2, 7]  # the first three ids seen, in order
    sp = torch.nn.functional.softplus
    prim, rot = method.hparams()
    expected = sp(prim[torch.tensor([5, 2, 7]), 0]).detach().numpy()
    assert np.allclose(trace["probe_weights"][:, 0], expected)
    assert np.allclose(trace["probe_weights"][:, 1], sp(rot[torch.tensor([5, 2, 7]), 0]).detach().numpy())
    assert trace["probe_corrupted"].tolist() == [False, True, False]
    assert trace["weight_corrupted"] == pytest.approx(float(expected[1]))
    assert trace["weight_clean"] == pytest.approx(float((expected[0] + expected[2]) / 2))


# ----------------------------------------------------------------------------- label noise
def _noisy_run(method, seed, epochs=30):
    src = SyntheticSource(n=1000, dim=8, num_classes=4, aux="helpful", noise=0.1, seed=seed)
    bundle = src.bundle(val_size=0.2, test_size=0.2, dev_size=40, label_noise=0.4, seed=seed)
    torch.manual_seed(seed)
    model = MultiHeadModel.for_tasks(MLP(8, hidden=(64,)), src.tasks())
    return Trainer(model, method, bundle, epochs=epochs, batch_size=64, optimizer="sgd", lr=0.1,
                   seed=seed, device="cpu", progress=False).fit()


def test_corrupted_samples_end_with_clearly_lower_weight_than_clean_ones():
    """Synthetic source, 4 classes, label_noise=0.4 (effective flip rate 0.3), 600 training samples,
    40 clean dev samples, SGD 0.1 (momentum 0.9) for 30 epochs, every training sample a probe.

    Configuration checked: ``JTDS.paper(normalize="batch_mean", hyper_lr=1.0, lower_steps=10)``, i.e. the
    paper's Eq. 9 step η = 1 with K = 3, φ on SGD 1e-2 momentum 0.9 and clipping 10, plus the
    batch-mean normalisation of the sample factor (which, since issue 8, also pins the primary task's
    weight at 1). Margin: in each of 3 seeds the corrupted samples' mean primary weight is below the
    clean samples', and on average at most 0.7× (measured: 0.57, 0.51, 0.86; before the primary
    weight was pinned: 0.54, 0.56, 0.69 — the per-seed 0.8 margin of that rule no longer holds for
    seed 2, and the rule changed on purpose, see the chapter 06).

    Why this configuration (measured on this problem, 3–8 seeds): with the authors' η = lower lr
    the filter slope a drifts *positive* (corrupted/clean ≈ 1.02–1.1): the short-horizon
    hypergradient favours high-loss samples. With η = 1 the Neumann series diverges
    (η·λ_max(J) ≈ 3–5) and the sign of a's drift alternates with the parity of K: K = 3 or 5 give
    ratios 0.54–0.69, K = 2 or 4 give 1.2–1.8. Without the normalisation the overall scale of w
    drifts instead (weights collapse towards 0 with η = 1 and upper_lr 0.1; ratio ≈ 1 with upper_lr 1e-2).
    """
    ratios = []
    for seed in range(3):
        result = _noisy_run(JTDS.paper(normalize="batch_mean", hyper_lr=1.0, lower_steps=10, probe_size=None), seed)
        last = result.trace[-1]
        assert np.isfinite(last["probe_weights"][:, 0]).sum() >= 550  # (nearly) every training sample seen
        ratios.append(last["weight_corrupted"] / last["weight_clean"])
        assert last["filter_a"][0] < 0  # the primary filter learned: larger normalised loss, smaller weight
    assert max(ratios) < 1.0 and float(np.mean(ratios)) <= 0.7, ratios


def test_same_seed_gives_the_same_schedule_and_metrics():
    a = _noisy_run(JTDS(normalize="batch_mean", hyper_lr=1.0, lower_steps=10, fallback=None), seed=4, epochs=3)
    b = _noisy_run(JTDS(normalize="batch_mean", hyper_lr=1.0, lower_steps=10, fallback=None), seed=4, epochs=3)
    assert a.test_metric == b.test_metric
    assert np.array_equal(a.trace[-1]["probe_weights"], b.trace[-1]["probe_weights"], equal_nan=True)
    assert np.array_equal(a.trace[-1]["filter_a"], b.trace[-1]["filter_a"])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="variant"):
        JTDS("w/o-everything")
    with pytest.raises(ValueError, match="normalize"):
        JTDS(normalize="softmax-ish")
    with pytest.raises(ValueError, match="init_weight"):
        NJTDS(init_weight=0.0)
    with pytest.raises(TypeError, match="out_features"):
        JTDS().setup(nn.Identity(), _info(TaskSet([Task("m", "regression", primary=True)])))
    paper = JTDS.paper()
    assert math.isclose(paper.upper_lr, 1e-2) and paper.terms == 3 and paper.upper_momentum == 0.9


def test_noise_trace_and_plots_report_the_hand_computed_batch_statistics():
    """`noise_trace` = the mean primary weight of the corrupted / clean samples of the batches since the
    last call and the batches' mean AUC, computed here by hand from the weights the method used."""
    import matplotlib

    matplotlib.use("Agg")
    from auxnb import plot
    from auxnb.methods.jtds import weight_auc

    tasks = TaskSet([Task("main", "classification", 3, primary=True)])
    corrupted = torch.tensor([False, True, False, True, False, False])
    method = JTDS("no-feature", fallback=None)
    method.setup(_Features(2), _info(tasks, {"bundle_info": {"corrupted": corrupted}}))
    with torch.no_grad():
        method.filter_a.fill_(-1.0)
    theta = torch.ones(1, requires_grad=True)
    used = []
    for ids, losses in (([0, 1, 2, 3], [0.1, 2.0, 0.3, 1.5]), ([4, 5, 1], [0.2, 0.9, 3.0])):
        terms = LossTerms(tasks, {"main": theta * torch.tensor(losses)}, {"main": torch.ones(len(ids), dtype=torch.bool)},
                          {}, {}, {}, index={"primary": torch.tensor(ids)})
        used.append((ids, method.schedule(terms)["main"].detach().numpy()))
        method.direction(terms, [theta])
    bad = [w for ids, ws in used for i, w in zip(ids, ws) if corrupted[i]]
    good = [w for ids, ws in used for i, w in zip(ids, ws) if not corrupted[i]]
    aucs = [weight_auc(ws, corrupted[ids].numpy()) for ids, ws in used]
    out = method.trace()
    assert out["batch_weight_corrupted"] == pytest.approx(np.mean(bad))
    assert out["batch_weight_clean"] == pytest.approx(np.mean(good))
    assert out["batch_weight_auc"] == pytest.approx(np.mean(aucs)) and out["batch_weight_auc"] == 1.0  # a < 0: high loss, low weight
    assert method.trace()["batch_weight_auc"] == out["batch_weight_auc"]  # no new batch: the same window
    fig = plot.noise_separation([{"step": 1, **out}, {"step": 2, **out}])
    assert len(fig.axes) == 2


def test_curvature_hint_gives_the_auxiliary_weights_relative_to_the_primary():
    """The hint of the λ_max runaway warning: σ1(α_k)/σ1(α_G) (σ1 = softplus, the default) by hand at the α of a
    run that diverged (methods_learn.md §15: α_G = −23.1, α_aux = 8.6, a relative weight of ~10¹¹); none without
    normalisation, where the task weights are not relative to the primary's."""
    method = JTDS(pin_primary=False)  # the stopped run learned α_G
    method.setup(_Features(3), _info(TASKS_TWO_STREAMS))
    names = method._names
    primary = method._primary_col
    alpha = torch.full((len(names),), 8.6)
    alpha[primary] = -23.1
    with torch.no_grad():
        method.alpha.copy_(alpha)
    hint = method.curvature_hint()
    expected = _softplus(8.6) / _softplus(-23.1)
    for k, name in enumerate(names):
        if k != primary:
            assert f"{name}: {expected:.3g}" in hint
    assert f"{names[primary]}:" not in hint
    raw = JTDS.paper()  # normalize="none": the task weights are σ1(α_k) themselves
    raw.setup(_Features(3), _info(TASKS_TWO_STREAMS))
    assert raw.curvature_hint() == ""


def test_pin_primary_fixes_the_primary_alpha_and_keeps_the_auxiliary_formula():
    """pin_primary=True: the task weights are σ1(α_k)/σ1(α₀) for the auxiliary tasks and exactly 1 for the primary,
    whatever α_G holds (α₀ = 1, where α starts; σ1 = softplus, by hand); α_G has no effect and gets no gradient,
    every α_k does. pin_primary=False: σ1(α_k)/σ1(α_G), and α_G's gradient is not zero."""
    terms, _ = _hand_terms(np.random.default_rng(3))
    grads = {}
    for pin in (False, True):
        method = JTDS("only-task", pin_primary=pin)
        method.setup(_Features(3), _info(TASKS_TWO_STREAMS))
        names = method._names
        g = method._primary_col
        assert torch.equal(method.alpha.detach(), torch.ones(len(names)))  # α₀ = 1
        with torch.no_grad():
            method.alpha.copy_(torch.tensor([0.3, -0.7, 1.9][: len(names)]))
        weights = method.schedule(terms)
        alpha = method.alpha.detach().double().numpy()
        rel = _softplus(alpha) / (_softplus(1.0) if pin else _softplus(alpha[g]))
        rel[g] = 1.0
        for k, name in enumerate(names):
            assert np.allclose(weights[name].detach().numpy(), rel[k], rtol=1e-6)
        total = sum((weights[name] * (k + 1)).sum() for k, name in enumerate(names))
        (grads[pin],) = torch.autograd.grad(total, [method.alpha])
    assert grads[True][g] == 0.0 and grads[False][g] != 0.0
    assert all(grads[True][k] != 0.0 for k in range(len(names)) if k != g)
    with pytest.raises(TypeError, match="pin_primary"):
        JTDS(pin_primary="yes")
