"""ForkMerge against independent truth: a branch's steps are plain SGD on its weighted losses computed by
hand, the merge picks the grid's minimiser of the D_dev loss computed in closed form, the authors'
greedy search traced by hand, the branch that is the primary task alone with its weight forced to 1 is
STL exactly, buffers merge with the parameters' weights, and a run resumed from a checkpoint taken
mid-interval is the uninterrupted run."""

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from helpers import Stop, setup_info, stop_at_eval
from torch import nn

from auxnb import methods
from auxnb.data import TaskDataset, build_bundle
from auxnb.methods import STL, ForkMerge
from auxnb.methods.base import compute_terms
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import PRIMARY_STREAM, Task, TaskSet
from auxnb.train import LowerContext, Trainer

NAMES = ["y", "a"]


def _tasks():
    return TaskSet([Task("y", "regression", primary=True), Task("a", "regression")])


class Linear(nn.Module):
    """Task k's output on inputs x: x·w + c_k (a shared w, one offset per task); squared-error losses."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
        self.c = nn.ParameterDict({n: nn.Parameter(torch.tensor(0.1 * (i + 1), dtype=torch.float64)) for i, n in enumerate(NAMES)})

    def forward(self, x, names):
        f = x @ self.w
        return f, {n: (f + self.c[n]).unsqueeze(1) for n in names}


def _batch(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return {PRIMARY_STREAM: (x, {k: torch.randn(n, generator=g, dtype=torch.float64) for k in NAMES})}


def _context(lr, make_lr=1.0):
    host_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    return LowerContext(optimizer=host_opt, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=make_lr), grad_clip=None,
                        freeze_aux_buffers=False, autocast=nullcontext, step=1)


def _hand_grad(w, c, batch, weights):
    """∇ of Σ_k λ_k mean_i (x_i·w + c_k − y_ki)², written out: (∂w, {k: ∂c_k})."""
    x, y = batch[PRIMARY_STREAM]
    gw, gc = torch.zeros_like(w), {}
    for k, lam in weights.items():
        r = x @ w + c[k] - y[k]
        gw = gw + lam * (2 * r[:, None] * x).mean(0)
        gc[k] = lam * (2 * r).mean()
    return gw, gc


def test_a_branch_takes_plain_sgd_steps_on_its_weighted_losses_at_the_trainers_learning_rate():
    tasks = _tasks()
    model = Linear()
    method = ForkMerge(["all", {"y": 1.0, "a": 0.25}], interval=100)
    method.setup(model, setup_info(tasks))
    host_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w, c = model.w.detach().clone(), {k: model.c[k].detach().clone() for k in NAMES}
    lr = 0.1
    ctx = _context(lr, make_lr=5.0)  # the branch's optimiser is built at 5.0; it must step at the Trainer's 0.1
    for t in range(3):
        batch = _batch(t)
        terms = compute_terms(model, batch, tasks, names=method.task_names(tasks))
        # the host's direction is the gradient of its own weights ("all": 1 and 1), by hand
        gw_host, gc_host = _hand_grad(model.w.detach(), {k: model.c[k].detach() for k in NAMES}, batch, {"y": 1.0, "a": 1.0})
        got = dict(zip([n for n, _ in model.named_parameters()], method.direction(terms, list(model.parameters()))))
        assert torch.allclose(got["w"], gw_host, rtol=1e-12, atol=1e-14)
        assert torch.allclose(got["c.a"], gc_host["a"], rtol=1e-12, atol=1e-14)
        method.after_lower(terms, ctx)
        gw, gc = _hand_grad(w, c, batch, {"y": 1.0, "a": 0.25})
        w = w - lr * gw
        c = {k: c[k] - lr * gc[k] for k in NAMES}
    branch = method._tensors[1]
    assert torch.allclose(branch["w"], w, rtol=1e-12, atol=1e-14)
    for k in NAMES:
        assert torch.allclose(branch[f"c.{k}"], c[k], rtol=1e-12, atol=1e-14)
    # the branch trains its own copy: the model (the host, which the Trainer steps) is untouched
    assert all(torch.equal(v, host_before[k]) for k, v in model.state_dict().items())


def test_extra_losses_enter_every_branch_but_the_primary_alone_with_that_branchs_parameters():
    from auxnb.methods import l2_penalty

    tasks = _tasks()
    model = Linear()
    # the host is "primary" (both branches need only y); the dict branch {y: 1} adds 0.5 · Σ‖p‖²
    method = ForkMerge(["primary", {"y": 1.0}], aux_losses={"l2": l2_penalty(scale=0.5)})
    method.setup(model, setup_info(tasks))
    assert method._host == 0 and method.task_names(tasks) == ["y"]
    w, c = model.w.detach().clone(), {k: model.c[k].detach().clone() for k in NAMES}
    with torch.no_grad():  # the branch moves away from the host first, so its own tensors are what L2 reads
        method._tensors[1]["w"].add_(1.0)
    batch = _batch(0)
    terms = compute_terms(model, batch, tasks, names=["y"])
    host = dict(zip([n for n, _ in model.named_parameters()], method.direction(terms, list(model.parameters()))))
    gw, gc = _hand_grad(w, c, batch, {"y": 1.0})
    assert torch.allclose(host["w"], gw, rtol=1e-12) and torch.equal(host["c.a"], torch.zeros_like(host["c.a"]))
    method.after_lower(terms, _context(0.1))
    w1 = w + 1.0
    gw1, gc1 = _hand_grad(w1, c, batch, {"y": 1.0})
    # ∇ 0.5·Σ‖p‖² = p, on every trainable tensor of the branch (c_a gets it alone)
    assert torch.allclose(method._tensors[1]["w"], w1 - 0.1 * (gw1 + w1), rtol=1e-12)
    assert torch.allclose(method._tensors[1]["c.y"], c["y"] - 0.1 * (gc1["y"] + c["y"]), rtol=1e-12)
    assert torch.allclose(method._tensors[1]["c.a"], c["a"] - 0.1 * c["a"], rtol=1e-12)


def _two_branch_merge(search, alphas):
    """Branch 0 ('all', the host) at θ0, branch 1 ('primary') at θ1; D_dev targets of the primary task made by
    θ* = 0.4 θ0 + 0.6 θ1 plus a little noise: the D_dev loss of the mixture, by hand, is smallest near λ = 0.6."""
    tasks = _tasks()
    model = Linear()
    method = ForkMerge(["all", "primary"], interval=1, alphas=alphas, search=search, dev_batches=2)
    method.setup(model, setup_info(tasks))
    assert method._host == 0
    theta = {0: {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), "c.y": torch.tensor(0.3, dtype=torch.float64)},
             1: {"w": torch.tensor([-1.0, 1.0, 2.0], dtype=torch.float64), "c.y": torch.tensor(-0.7, dtype=torch.float64)}}
    with torch.no_grad():
        for b in (0, 1):
            for k, v in theta[b].items():
                method._tensors[b][k].copy_(v)
    g = torch.Generator().manual_seed(7)
    dev = []
    for _ in range(2):
        x = torch.randn(6, 3, generator=g, dtype=torch.float64)
        star_w, star_c = 0.4 * theta[0]["w"] + 0.6 * theta[1]["w"], 0.4 * theta[0]["c.y"] + 0.6 * theta[1]["c.y"]
        y = x @ star_w + star_c + 0.01 * torch.randn(6, generator=g, dtype=torch.float64)
        dev.append({PRIMARY_STREAM: (x, {"y": y})})
    feed = iter(dev)
    ctx = SimpleNamespace(dev_batch=lambda: next(feed), step=1)

    def hand_loss(lam):  # the mixture's mean squared error on both dev batches, in closed form
        w = lam[0] * theta[0]["w"] + lam[1] * theta[1]["w"]
        c = lam[0] * theta[0]["c.y"] + lam[1] * theta[1]["c.y"]
        r = torch.cat([b[PRIMARY_STREAM][0] @ w + c - b[PRIMARY_STREAM][1]["y"] for b in dev])
        return float((r ** 2).mean())

    info = method.upper_step(model, ctx)
    return method, model, theta, info, hand_loss


def test_grid_merge_picks_the_mixture_with_the_smallest_dev_loss_computed_in_closed_form():
    alphas = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    method, model, theta, info, hand_loss = _two_branch_merge("grid", alphas)
    # the grid: Λ = (1 − λ, λ) over branch 1's λ in alphas; branch 0 is "all", branch 1 "primary"
    losses = {lam: hand_loss([1 - lam, lam]) for lam in alphas}
    best = min(alphas, key=lambda lam: losses[lam])
    assert best == 0.6  # the test's data put the minimiser inside the grid
    assert info["weight/primary"] == pytest.approx(best) and info["weight/all"] == pytest.approx(1 - best)
    assert info["dev_loss"] == pytest.approx(losses[best], rel=1e-12)
    # the model (the host) and the other branch now hold the mixture
    w = (1 - best) * theta[0]["w"] + best * theta[1]["w"]
    assert torch.allclose(model.w.detach(), w, rtol=1e-12) and torch.allclose(method._tensors[1]["w"], w, rtol=1e-12)
    assert torch.allclose(model.c["y"].detach(), (1 - best) * theta[0]["c.y"] + best * theta[1]["c.y"], rtol=1e-12)


def test_greedy_merge_follows_the_authors_rule_traced_by_hand():
    # the authors' greedy search with two branches: the better branch alone gets 1, the other α·1, then both
    # are normalised: the other's share is α/(1 + α) ∈ {0, 1/6, 2/7, 3/8, 4/9, 1/2}, never more than a half
    alphas = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    method, model, theta, info, hand_loss = _two_branch_merge("greedy", alphas)
    alone = {"all": hand_loss([1, 0]), "primary": hand_loss([0, 1])}
    assert alone["primary"] < alone["all"]  # so "primary" leads, and "all" gets the share α/(1 + α)
    shares = {a: a / (1 + a) for a in alphas}
    scores = {a: hand_loss([shares[a], 1 - shares[a]]) for a in alphas}
    best = min(alphas, key=lambda a: scores[a])
    assert best == 0.6  # 3/8 is the share nearest the true 0.4
    assert info["weight/all"] == pytest.approx(3 / 8) and info["weight/primary"] == pytest.approx(5 / 8)
    assert torch.allclose(model.w.detach(), 3 / 8 * theta[0]["w"] + 5 / 8 * theta[1]["w"], rtol=1e-12)


@pytest.mark.parametrize("branches,target,search,expected", [
    # greedy, two branches, α ∈ {0, ½, 1}: e0 scores .32, e1 .72; (2/3, 1/3) scores .0089, (½, ½) .02
    (2, (0.6, 0.4), "greedy", (2 / 3, 1 / 3)),
    # the paper's grid reaches (½, ½) (.02), which greedy cannot here (the same scores)
    (2, (0.6, 0.4), "grid", (0.5, 0.5)),
    # greedy, three branches (hand trace in the comment below): (8/15, 4/15, 3/15)
    (3, (0.5, 0.3, 0.2), "greedy", (8 / 15, 4 / 15, 3 / 15)),
])
def test_the_search_returns_the_weights_traced_by_hand(branches, target, search, expected):
    # score = squared distance of Λ to `target`. Three branches, greedy: alone .38, .78, .98 -> order 0, 1, 2;
    # branch 1: bound 1, α = ½ gives (2/3, 1/3, 0) at .0689, α = 1 (½, ½, 0) at .08 -> weight ½;
    # branch 2: bound (1 + ½)/2 = ¾, α = ½ gives (1, ½, 3/8)/(15/8) = (8/15, 4/15, 1/5) at .0022, α = 1 (4/9, 2/9, 1/3) at .027
    method = ForkMerge(["all", "primary", {"y": 1.0}][:branches], alphas=[0.0, 0.5, 1.0], search=search)
    lam, score, seen = method.choose(lambda lam: sum((a - b) ** 2 for a, b in zip(lam, target)))
    assert lam == pytest.approx(list(expected), abs=1e-12)
    assert score == pytest.approx(sum((a - b) ** 2 for a, b in zip(expected, target)), abs=1e-12)


def test_a_candidate_with_a_non_finite_dev_score_is_never_chosen():
    method = ForkMerge(["all", "primary"], alphas=[0.0, 0.5, 1.0], search="grid")
    lam, _, _ = method.choose(lambda lam: float("nan") if lam[1] == 0.5 else lam[1])
    assert lam == [1.0, 0.0]


class _DevSTL(STL):
    """STL on D_train alone (STL itself trains on D_train ∪ D_dev), as ForkMerge's branches are trained."""

    uses_dev = True


def _small_bundle(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    a = (x[:, 2] > 0).long()
    tasks = TaskSet([Task("y", "classification", 2, primary=True), Task("a", "classification", 2)])
    return build_bundle(TaskDataset(x, {"y": y, "a": a}), tasks, val_size=24, test_size=24, dev_size=16, seed=seed), tasks


@pytest.mark.parametrize("optimizer,grad_clip", [("sgd", 0.05), ("adam", None)])
def test_forkmerge_with_the_merge_forced_onto_the_primary_branch_is_stl_exactly(optimizer, grad_clip):
    bundle, tasks = _small_bundle()
    kw = dict(steps=12, eval_every=3, batch_size=16, optimizer=optimizer, lr=0.05, scheduler="cosine", grad_clip=grad_clip,
              seed=0, device="cpu", progress=False)

    def model_fn():
        return MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)

    # Λ = (1, 0) at every merge: the grid with only λ = 0 for the second branch ("all", the host)
    forkmerge = ForkMerge(["primary", "all"], interval=3, alphas=[0.0], search="grid")
    fm = Trainer(model_fn, forkmerge, bundle, **kw).fit()
    stl = Trainer(model_fn, _DevSTL(), bundle, **kw).fit()
    assert forkmerge._host == 1 and forkmerge.merges == 4
    for col in ("val_loss", "val_accuracy"):
        assert fm.history[col].tolist() == stl.history[col].tolist(), col
    assert fm.best_step == stl.best_step
    for k, v in stl.weights.items():
        assert torch.equal(fm.weights[k], v), k


def test_a_merge_mixes_batchnorm_statistics_with_the_parameters_weights():
    tasks = TaskSet([Task("y", "classification", 2, primary=True), Task("a", "classification", 2)])
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU())
    backbone.out_features = 5
    model = MultiHeadModel.for_tasks(backbone, tasks)
    method = ForkMerge(["all", "primary"], interval=1, alphas=[0.25], search="grid")  # Λ = (¾, ¼)
    method.setup(model, setup_info(tasks))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g)
    batch = {PRIMARY_STREAM: (x, {"y": (x[:, 0] > 0).long(), "a": (x[:, 1] > 0).long()})}
    model.train()
    terms = compute_terms(model, batch, tasks, names=method.task_names(tasks))  # the host's forward
    method.after_lower(terms, _context(0.1))
    terms = compute_terms(model, batch, tasks, names=["y"])  # the host's second forward
    host_rm = model.backbone[1].running_mean.detach().clone()
    method.after_lower(terms, _context(0.1))  # the other branch's forward moves its statistics only
    assert torch.equal(model.backbone[1].running_mean, host_rm)
    rm = [method._tensors[b]["backbone.1.running_mean"].clone() for b in (0, 1)]
    rv = [method._tensors[b]["backbone.1.running_var"].clone() for b in (0, 1)]
    assert not torch.equal(rm[0], rm[1])
    counts = [int(method._tensors[b]["backbone.1.num_batches_tracked"]) for b in (0, 1)]
    assert counts == [2, 2]  # each branch's own count (the host: the two forwards above)
    method._tensors[1]["backbone.1.num_batches_tracked"].fill_(5)
    dev = {PRIMARY_STREAM: (x, {"y": batch[PRIMARY_STREAM][1]["y"]})}
    method.upper_step(model, SimpleNamespace(dev_batch=lambda: dev, step=2))
    assert torch.allclose(model.backbone[1].running_mean, 0.75 * rm[0] + 0.25 * rm[1], rtol=1e-6, atol=1e-7)
    assert torch.allclose(model.backbone[1].running_var, 0.75 * rv[0] + 0.25 * rv[1], rtol=1e-6, atol=1e-7)
    # the integer count comes from the branch with the larger weight (the host, ¾)
    assert int(model.backbone[1].num_batches_tracked) == 2
    assert torch.equal(method._tensors[1]["backbone.1.running_mean"], model.backbone[1].running_mean)


def test_a_run_resumed_from_a_checkpoint_taken_mid_interval_is_the_uninterrupted_run(tmp_path):
    bundle, tasks = _small_bundle()
    kw = dict(steps=12, eval_every=3, batch_size=16, optimizer="adam", lr=0.05, seed=0, device="cpu", progress=False)

    def model_fn():
        return MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)

    def method():  # merges at 5 and 10; checkpoints at 3, 6, 9, 12: between merges
        return ForkMerge(["all", "primary"], interval=5, dev_batches=2)

    full = Trainer(model_fn, method(), bundle, **kw).fit()

    class Stop(Exception):
        pass

    def stop_at_6(event, info):
        if event == "eval" and info["step"] == 6:
            raise Stop

    with pytest.raises(Stop):
        Trainer(model_fn, method(), bundle, checkpoint_dir=tmp_path, callbacks=[stop_at_6], **kw).fit()
    resumed = Trainer(model_fn, method(), bundle, checkpoint_dir=tmp_path, resume=True, **kw).fit()
    cols = [c for c in full.history.columns if c != "seconds"]
    assert resumed.history[cols].equals(full.history[cols])
    assert resumed.trace == full.trace and resumed.best_step == full.best_step
    for k, v in full.weights.items():
        assert torch.equal(resumed.weights[k], v), k
    assert [t["merges"] for t in full.trace] == [0, 1, 1, 2]


@pytest.mark.parametrize("kwargs,match", [
    ({"branches": ["primary", "everything"]}, "Unknown branch 'everything'"),
    ({"branches": "all"}, "non-empty list"),
    ({"branches": [{"y": -1.0}]}, "weights >= 0"),
    ({"interval": 0}, "interval must be an integer >= 1"),
    ({"interval": "quarter"}, "or .auto."),
    ({"interval": 1.0}, "a fraction of the run in \\(0, 1\\)"),
    ({"interval": 0.0}, "a fraction of the run in \\(0, 1\\)"),
    ({"interval": 2.5}, "a fraction of the run in \\(0, 1\\)"),
    ({"alphas": [0.0, 1.5]}, "numbers in \\[0, 1\\]"),
    ({"search": "beam"}, "search must be one of"),
    ({"criterion": "accuracy"}, "criterion must be one of"),
    ({"dev_batches": 0}, "dev_batches must be an integer >= 1"),
])
def test_bad_configuration_is_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForkMerge(**kwargs)


def test_a_branch_naming_an_unknown_task_and_fp16_are_refused_before_training():
    bundle, tasks = _small_bundle()
    model = MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)
    with pytest.raises(ValueError, match="names tasks \\['rotation'\\]"):
        Trainer(model, ForkMerge(["primary", {"rotation": 1.0}]), bundle, steps=2, progress=False, device="cpu").fit()
    with pytest.raises(ValueError, match="amp='bf16'"):
        Trainer(MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks), ForkMerge(), bundle, steps=2, amp="fp16",
                progress=False, device="cpu").fit()


def test_forkmerge_is_registered_and_its_authors_preset_takes_their_interval_in_epochs():
    assert isinstance(methods.get("forkmerge"), ForkMerge)
    m = ForkMerge.authors("domainnet", steps_per_epoch=40)
    assert (m.interval, m.lower_steps, m.criterion, m.search, m.branches) == (200, 200, "metric", "greedy", ["all", "primary"])
    assert ForkMerge.authors("nyuv2", steps_per_epoch=10).interval == 300
    assert ForkMerge.paper("nyuv2", steps_per_epoch=10, dev_batches=2).config() == ForkMerge.authors(
        "nyuv2", steps_per_epoch=10, dev_batches=2).config()
    with pytest.raises(ValueError, match="the authors' are domainnet, nyuv2"):
        ForkMerge.authors("cifar", steps_per_epoch=10)


@pytest.mark.parametrize("steps,interval,merges", [(12, 3, 4), (10, 2, 5), (93, 23, 4), (2, 1, 2)])
def test_the_auto_interval_is_a_quarter_of_the_run_so_a_short_run_merges(steps, interval, merges):
    bundle, tasks = _small_bundle()
    method = ForkMerge(["all", "primary"], dev_batches=1)
    assert method.interval == "auto" and method.lower_steps is None  # resolved from the run's length at set-up
    r = Trainer(MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks), method, bundle, steps=steps, eval_every=steps,
                batch_size=16, seed=0, device="cpu", progress=False).fit()
    assert method.lower_steps == interval == max(1, round(steps / 4))
    assert r.trace[-1]["merges"] == merges == steps // interval


@pytest.mark.parametrize("steps,share,interval,merges", [(12, 0.125, 2, 6), (40, 0.125, 5, 8), (40, 0.5, 20, 2),
                                                         (93, 0.25, 23, 4), (5, 0.01, 1, 5)])
def test_a_fractional_interval_is_that_share_of_the_run(steps, share, interval, merges):
    bundle, tasks = _small_bundle()
    method = ForkMerge(["all", "primary"], interval=share, dev_batches=1)
    r = Trainer(MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks), method, bundle, steps=steps, eval_every=steps,
                batch_size=16, seed=0, device="cpu", progress=False).fit()
    assert method.lower_steps == interval and method.interval == share  # the configuration keeps the share
    assert r.trace[-1]["merges"] == merges


def test_an_interval_longer_than_the_run_is_refused_before_training_naming_the_fix():
    bundle, tasks = _small_bundle()
    seen = []
    with pytest.raises(ValueError, match=r"never merge: interval=100 lower steps, but this run has 12; give interval <= 12"):
        Trainer(MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks), ForkMerge(interval=100), bundle, steps=12,
                progress=False, device="cpu", callbacks=[lambda event, info: seen.append(event)]).fit()
    assert "eval" not in seen  # nothing was trained


# --------------------------------------------------------------------------- the pruning stage (topk)
def _three_task_bundle(n=200, seed=0):
    """y (primary), a second classification task and a regression task: two auxiliary tasks to rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    tasks = TaskSet([Task("y", "classification", 2, primary=True), Task("a", "classification", 2), Task("r", "regression")])
    targets = {"y": y, "a": (x[:, 2] > 0).long(), "r": x[:, 3] - x[:, 4]}
    return build_bundle(TaskDataset(x, targets), tasks, val_size=40, test_size=24, dev_size=16, seed=seed), tasks


def _pruning_kw(**extra):
    return {**dict(steps=24, eval_every=4, batch_size=16, optimizer="sgd", lr=0.05, scheduler="cosine", seed=0,
                   device="cpu", progress=False), **extra}


@pytest.mark.parametrize("ranking,topk,expected", [
    (["b", "a", "c"], (0, 1, 2), ["primary", {"y": 1.0, "b": 1.0}, {"y": 1.0, "b": 0.5, "a": 0.5}]),
    # the authors' DomainNet --topk 0 3 5: the target alone, with the top three at 1/3, with all five at 1/5
    (["d", "e", "a", "c", "b"], (0, 3, 5), ["primary", {"y": 1.0, "d": 1 / 3, "e": 1 / 3, "a": 1 / 3},
                                            {"y": 1.0, "d": 0.2, "e": 0.2, "a": 0.2, "c": 0.2, "b": 0.2}]),
    (["a"], (1, 0), [{"y": 1.0, "a": 1.0}, "primary"]),  # topk's order is the branches' order
])
def test_the_topk_branches_follow_the_authors_rule_written_out_by_hand(ranking, topk, expected):
    from auxnb.methods.forkmerge import topk_branches

    assert topk_branches(ranking, topk, "y") == expected
    with pytest.raises(ValueError, match=rf"top {len(ranking) + 1} auxiliary tasks, but this run has {len(ranking)}"):
        topk_branches(ranking, (*topk, len(ranking) + 1), "y")


@pytest.mark.parametrize("scores,higher,expected", [
    ({"a": 0.8, "b": 0.9, "c": 0.7}, True, ["b", "a", "c"]),
    ({"a": 0.8, "b": 0.9, "c": 0.7}, False, ["c", "a", "b"]),  # an error metric (RMSE): lower first
    ({"a": math.nan, "b": 0.5, "c": math.inf}, True, ["b", "a", "c"]),  # a non-finite score ranks last
    ({"a": 0.5, "b": 0.5, "c": 0.6}, False, ["a", "b", "c"]),  # ties keep the task order
])
def test_the_ranking_orders_tasks_by_their_ranking_runs_metric_in_its_own_direction(scores, higher, expected):
    from auxnb.methods.forkmerge import rank_tasks

    assert rank_tasks(scores, higher) == expected


def test_the_pruning_stage_ranks_on_its_ranking_runs_and_trains_exactly_the_branches_they_give():
    from auxnb import selection
    from auxnb.methods.forkmerge import rank_tasks, topk_branches

    bundle, tasks = _three_task_bundle()

    def model_fn():
        return MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)

    pruned = Trainer(model_fn, ForkMerge(topk=(0, 1, 2), prune_steps=8, dev_batches=1), bundle, **_pruning_kw()).fit()
    info = pruned.config["selection"]
    assert info["kind"] == "ranking" and list(pruned.candidates) == ["rank-a", "rank-r", "forkmerge"]
    for key in ("rank-a", "rank-r"):  # each ranking run stops after prune_steps lower steps
        assert pruned.candidates[key].history["step"].max() == info["prune_steps"] == 8
    scores = {t: pruned.candidates[f"rank-{t}"].val_metric for t in ("a", "r")}
    assert info["ranking"] == rank_tasks(scores, higher_is_better=True)
    branches = topk_branches(info["ranking"], (0, 1, 2), "y")
    assert info["branches"] == branches
    # the run the stage keeps is ForkMerge with those branches, trained alone from the same weights and seed
    alone = Trainer(model_fn, ForkMerge(branches, dev_batches=1), bundle, **_pruning_kw()).fit()
    for k, v in alone.weights.items():
        assert torch.equal(pruned.weights[k], v), k
    assert (pruned.val_metric, pruned.test_metric) == (alone.val_metric, alone.test_metric)
    assert pruned.timings["fits"] == 3 and pruned.timings["total_s"] > pruned.timings["run_total_s"]
    assert selection.describe(pruned).startswith("forkmerge: val ") and "ranking runs of 8 steps" in selection.describe(pruned)


def test_a_ranking_run_is_the_start_of_the_pair_run_on_the_whole_runs_schedule():
    """The authors' ranking runs train for their pruning epochs on the full run's cosine schedule: a
    ranking run is the first prune_steps steps of the pair's whole run, not a run annealed over prune_steps."""
    from auxnb.methods.forkmerge import _RankingRun

    bundle, tasks = _three_task_bundle()

    def model_fn():
        return MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)

    pruned = Trainer(model_fn, ForkMerge(topk=(0, 1), prune_steps=12, dev_batches=1), bundle, **_pruning_kw()).fit()
    whole = Trainer(model_fn, _RankingRun(["a"]), bundle, **_pruning_kw()).fit()  # the pair's whole 24-step run
    short = Trainer(model_fn, _RankingRun(["a"]), bundle, **_pruning_kw(steps=12)).fit()  # a 12-step run of its own
    cols = ["step", "val_loss", "val_accuracy"]
    ranking_run = pruned.candidates["rank-a"].history[cols].reset_index(drop=True)
    assert ranking_run.equals(whole.history[cols][whole.history["step"] <= 12].reset_index(drop=True))
    assert not ranking_run.equals(short.history[cols].reset_index(drop=True))  # the schedule is what differs


def test_a_pruning_stage_stopped_inside_its_second_ranking_run_resumes_to_the_uninterrupted_result(tmp_path):
    bundle, tasks = _three_task_bundle()

    def model_fn():
        return MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks)

    stop = stop_at_eval(3)  # rank-a: evaluations at 4 and 8; the first of rank-r
    method = lambda: ForkMerge(topk=(0, 1, 2), prune_steps=8, dev_batches=1)  # noqa: E731
    reference = Trainer(model_fn, method(), bundle, **_pruning_kw()).fit()
    with pytest.raises(Stop):
        Trainer(model_fn, method(), bundle, checkpoint_dir=tmp_path, callbacks=[stop], **_pruning_kw()).fit()
    from auxnb import selection
    from auxnb.checkpoint import CheckpointError

    state = selection.ckpt_io.load(tmp_path / selection.STATE_FILE)
    assert state["runs"]["rank-a"]["status"] == "done" and state["runs"]["rank-r"]["status"] == "running"
    resumed = Trainer(model_fn, method(), bundle, checkpoint_dir=tmp_path, resume=True, **_pruning_kw()).fit()
    assert resumed.config["selection"] == reference.config["selection"]
    for k, v in reference.weights.items():
        assert torch.equal(resumed.weights[k], v), k
    with pytest.raises(CheckpointError, match=r"run.method_config.prune_steps: 8 in the checkpoint, 12 now"):
        Trainer(model_fn, ForkMerge(topk=(0, 1, 2), prune_steps=12, dev_batches=1), bundle, checkpoint_dir=tmp_path,
                resume=True, **_pruning_kw()).fit()


@pytest.mark.parametrize("kwargs,match", [
    ({"topk": []}, "topk must be a non-empty list"),
    ({"topk": (0, 0)}, "distinct integers"),
    ({"topk": (0, -1)}, "integers >= 0"),
    ({"topk": "01"}, "topk must be"),
    ({"topk": (0, 1), "branches": ["primary", "all", {"y": 1.0}]}, "either branches or topk, not both"),
    ({"topk": (0, 1), "prune_steps": 0}, "prune_steps must be an integer >= 1"),
    ({"topk": (0, 1), "prune_steps": 1.5}, "or a fraction of the run in \\(0, 1\\)"),
])
def test_a_bad_pruning_configuration_is_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForkMerge(**kwargs)


@pytest.mark.parametrize("method,extra,match", [
    (lambda: ForkMerge(topk=(0, 3)), {}, r"top 3 auxiliary tasks, but this run has 2 \(a, r\); give topk values <= 2"),
    (lambda: ForkMerge(topk=(0, 1), prune_steps=50), {}, r"prune_steps=50 lower steps, but this run has 24"),
    (lambda: ForkMerge(topk=(0, 1)), {"guard": "stl"}, r"guard does not wrap that stage: pass guard=None"),
])
def test_a_pruning_stage_that_cannot_run_is_refused_before_any_ranking_run_trains(method, extra, match):
    bundle, tasks = _three_task_bundle()
    seen = []
    with pytest.raises(ValueError, match=match):
        Trainer(lambda: MultiHeadModel.for_tasks(MLP(6, hidden=(8,)), tasks), method(), bundle,
                callbacks=[lambda event, info: seen.append(event)], **_pruning_kw(), **extra).fit()
    assert "eval" not in seen


def test_the_authors_preset_with_pruning_takes_their_topk_and_pruning_epochs():
    m = ForkMerge.authors("domainnet", steps_per_epoch=40, pruning=True)
    assert (m.topk, m.prune_steps, m.interval) == ([0, 3, 5], 40, 200)
    n = ForkMerge.paper("nyuv2", steps_per_epoch=10, pruning=True)
    assert (n.topk, n.prune_steps, n.interval) == ([0, 1, 2], 100, 300)
    assert ForkMerge.authors("domainnet", steps_per_epoch=40).topk is None  # the two-branch form stays the default
