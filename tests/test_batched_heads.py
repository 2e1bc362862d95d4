"""Many heads as one module (issue 23 item 7): a `LinearBank` is the per-head ``nn.Linear`` set, in
values, gradients, initialisation, partitions (one block per head, MAOAL's α per head) and
checkpoints (a per-head training checkpoint is refused, naming the layout change; a results file's
weights load into either layout and predict the same)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxnb import checkpoint as ckpt_io
from auxnb.data import TaskDataset, build_bundle
from auxnb.methods import MAOAL
from auxnb.methods.base import SetupInfo, compute_terms
from auxnb.models import MLP, BankHead, LinearBank, MultiHeadModel
from auxnb.partition import ParamRow, by_block, by_parameter, custom, whole_model
from auxnb.tasks import PRIMARY_STREAM, Task, TaskSet
from auxnb.train import Trainer

D = 8  # feature size of the backbone


def _tasks(n_aux: int) -> TaskSet:
    return TaskSet([Task("y", "classification", 3, primary=True)] + [Task(f"a{i}", "binary") for i in range(n_aux)])


def _model(n_aux: int, bank, seed: int = 0) -> MultiHeadModel:
    torch.manual_seed(seed)
    return MultiHeadModel.for_tasks(MLP(4, hidden=(D,)), _tasks(n_aux), bank=bank)


def _bank(model: MultiHeadModel) -> LinearBank:
    (bank,) = model.head_banks.values()
    return bank


def test_banking_starts_at_bank_heads_same_shape_linear_heads_and_fewer_stay_per_head_modules():
    few = _model(MultiHeadModel.BANK_HEADS - 1, None)
    many = _model(MultiHeadModel.BANK_HEADS, None)
    assert not few.banked and all(type(h) is nn.Linear for h in few.heads.values())
    assert "heads.a0.weight" in dict(few.named_parameters())
    assert many.banked and len(_bank(many)) == MultiHeadModel.BANK_HEADS
    # the primary head (3 classes) has a shape of its own: it stays a module; the bank is 2 tensors
    assert type(many.heads["y"]) is nn.Linear and isinstance(many.heads["a0"], BankHead)
    assert sorted(n for n, _ in many.named_parameters() if not n.startswith("backbone.")) == [
        "head_banks.linear0.bias", "head_banks.linear0.weight", "heads.y.bias", "heads.y.weight"]
    assert _bank(many).weight.shape == (MultiHeadModel.BANK_HEADS, 1, D)
    # the public mapping: task order, membership, length, views with nn.Linear's attributes
    assert many.task_names == _tasks(MultiHeadModel.BANK_HEADS).names == list(many.heads)
    assert len(many.heads) == MultiHeadModel.BANK_HEADS + 1 and "a5" in many.heads and "zz" not in many.heads
    assert (many.heads["a5"].in_features, many.heads["a5"].out_features) == (D, 1)
    assert not list(many.heads["a5"].parameters())  # the view owns nothing: the bank's tensors count once


def test_bank_initialisation_is_the_per_head_nn_linear_initialisation_draw_for_draw():
    n = 40
    banked = _model(n, None, seed=3)
    after_banked = torch.rand(3)
    # the independent truth: the same draws made by hand, a backbone then one nn.Linear per task in task order
    torch.manual_seed(3)
    backbone = MLP(4, hidden=(D,))
    heads = {t.name: nn.Linear(D, t.out_dim) for t in _tasks(n)}
    after_hand = torch.rand(3)
    assert torch.equal(after_banked, after_hand)  # the bank drew nothing more
    for name, head in heads.items():
        assert torch.equal(banked.heads[name].weight, head.weight) and torch.equal(banked.heads[name].bias, head.bias), name
    for a, b in zip(banked.backbone.parameters(), backbone.parameters()):
        assert torch.equal(a, b)


def test_bank_outputs_and_gradients_equal_a_loop_of_plain_linear_maps():
    n = 40
    model = _model(n, None)
    bank = _bank(model)
    x = torch.randn(5, D)
    gen = torch.Generator().manual_seed(1)
    names = [f"a{i}" for i in (7, 0, 39, 12)]  # a subset, out of order
    cot = {name: torch.randn(5, 1, generator=gen) for name in names}
    outs = model.head_forward(x, names)
    assert list(outs) == names
    loss = sum((outs[name] * cot[name]).sum() for name in names)
    gw, gb = torch.autograd.grad(loss, [bank.weight, bank.bias])
    for name in names:
        w, b = bank.weight.detach()[bank.index(name)], bank.bias.detach()[bank.index(name)]
        torch.testing.assert_close(outs[name], F.linear(x, w, b), rtol=0, atol=1e-6)
        # closed form of d<u, xWᵀ + b>: dW = uᵀx, db = Σ_i u_i
        torch.testing.assert_close(gw[bank.index(name)], cot[name].T @ x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb[bank.index(name)], cot[name].sum(0), rtol=1e-6, atol=1e-6)
    untouched = [bank.index(f"a{i}") for i in range(n) if f"a{i}" not in names]
    assert gw[untouched].eq(0).all() and gb[untouched].eq(0).all()  # a head not asked for gets no gradient
    # and the same as per-head nn.Linear modules holding the same weights
    per_head = _model(n, False)
    with torch.no_grad():
        for name in model.task_names:
            per_head.heads[name].weight.copy_(model.heads[name].weight)
            per_head.heads[name].bias.copy_(model.heads[name].bias)
    ref = per_head.head_forward(x, names)
    ref_loss = sum((ref[name] * cot[name]).sum() for name in names)
    grads = torch.autograd.grad(ref_loss, [p for name in names for p in (per_head.heads[name].weight, per_head.heads[name].bias)])
    for k, name in enumerate(names):
        torch.testing.assert_close(gw[bank.index(name)], grads[2 * k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb[bank.index(name)], grads[2 * k + 1], rtol=1e-6, atol=1e-6)


def test_a_bank_head_view_reads_and_writes_its_row_of_the_bank():
    model = _model(40, None)
    bank, view = _bank(model), model.heads["a3"]
    with torch.no_grad():
        view.weight.copy_(torch.arange(D, dtype=torch.float32).reshape(1, D))
        view.bias.fill_(-2.0)
    assert torch.equal(bank.weight[3, 0], torch.arange(D, dtype=torch.float32)) and bank.bias[3, 0] == -2.0
    x = torch.ones(2, D)
    assert torch.equal(view(x), torch.full((2, 1), float(sum(range(D)) - 2)))
    with pytest.raises(TypeError, match="row of a LinearBank"):
        model.heads["a3"] = nn.Linear(D, 1)


def test_banked_and_per_head_models_have_the_same_partitions_group_for_group():
    banked, per_head = _model(40, None), _model(40, False)
    for make in (by_block, by_parameter, whole_model):
        a, b = make(banked), make(per_head)
        assert a.names == b.names and a.sizes == b.sizes, make.__name__
    part = by_block(banked)
    bank = _bank(banked)
    rows = part.groups_of(bank.weight)
    # head a_k's block holds exactly row k of the bank's weight and bias: D + 1 values
    for k in range(40):
        group = part[f"head:a{k}"]
        assert rows[k] == part.names.index(f"head:a{k}") and group.numel == D + 1
        assert group.names == (f"head_banks.linear0.weight[{k}]", f"head_banks.linear0.bias[{k}]")
    with pytest.raises(KeyError, match="split by rows"):
        part.group_of(bank.weight)


def test_a_partition_refuses_a_bank_row_in_two_groups_and_names_a_missing_row():
    model = _model(40, None)
    bank = _bank(model)
    base = [model.backbone, model.heads["y"]]
    everything = [ParamRow(bank.weight, k) for k in range(40)] + [ParamRow(bank.bias, k) for k in range(40)]
    custom(model, {"rest": base, "bank": everything})  # every row once: valid
    with pytest.raises(ValueError, match=r"head_banks.linear0.weight\[5\].*in groups"):
        custom(model, {"rest": base, "bank": everything, "again": [ParamRow(bank.weight, 5)]})
    with pytest.raises(ValueError, match=r"head_banks.linear0.bias\[39\].* in no group"):
        custom(model, {"rest": base, "bank": everything[:-1]})
    with pytest.raises(ValueError, match=r"in groups"):  # a whole parameter and one of its rows
        custom(model, {"rest": base, "bank": [bank.weight, bank.bias], "row": [ParamRow(bank.weight, 0)]})


def _bce_grad(x, w, b, y):
    """Closed form of ∇_(w, b) mean_i BCE(x_i·w + b, y_i): mean_i (σ(z_i) − y_i)·(x_i, 1)."""
    r = torch.sigmoid(x @ w + b) - y
    return (r[:, None] * x).mean(0), r.mean()


@pytest.mark.parametrize("chunk", [32, 1])  # per-loss gradients, and the module-by-module pass (many losses)
def test_maoal_alpha_of_a_banked_head_scales_exactly_that_heads_slice_of_the_gradient(chunk):
    n = 3
    tasks = _tasks(n)
    torch.manual_seed(0)
    model = MultiHeadModel.for_tasks(MLP(4, hidden=(D,)), tasks, bank=True)
    bank = _bank(model)
    part = by_block(model)
    heads = [part.names.index(f"head:a{k}") for k in range(n)]
    alpha = torch.arange(1, n * len(part) + 1, dtype=torch.float64).reshape(n, len(part)) / 10  # all different
    method = MAOAL(partition="block", init=alpha, scale_invariant="none")  # α as given: linear, clamped at 0
    method.grad_chunk = chunk
    method.setup(model, SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=6, seed=0))
    x = torch.randn(6, 4)
    targets = {"y": torch.randint(0, 3, (6,)), **{f"a{i}": torch.randint(0, 2, (6,)).float() for i in range(n)}}
    params = [p for p in model.parameters() if p.requires_grad]
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, tasks)
    direction = dict(zip([id(p) for p in params], method.direction(terms, params)))
    feats = model.backbone(x).detach()
    for k in range(n):
        # head a_k is read only by loss a_k (aux row k): its slice is α[k, its own block] · ∇L_ak, by hand
        gw, gb = _bce_grad(feats, bank.weight.detach()[k, 0], bank.bias.detach()[k, 0], targets[f"a{k}"])
        a = float(alpha[k, heads[k]])
        torch.testing.assert_close(direction[id(bank.weight)][k, 0], a * gw, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(direction[id(bank.bias)][k, 0], a * gb, rtol=1e-5, atol=1e-7)
    # changing α of another head's block (every row) leaves head a0's slice alone and scales a1's by the ratio
    with torch.no_grad():
        method.alpha[:, heads[1]] *= 3
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, tasks)
    again = dict(zip([id(p) for p in params], method.direction(terms, params)))
    assert torch.equal(again[id(bank.weight)][0], direction[id(bank.weight)][0])
    torch.testing.assert_close(again[id(bank.weight)][1], 3 * direction[id(bank.weight)][1], rtol=1e-6, atol=1e-8)
    assert torch.equal(again[id(bank.weight)][2], direction[id(bank.weight)][2])


def _bundle(n_aux: int):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    targets = {"y": (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1),
               **{f"a{i}": (x @ rng.normal(size=4) > 0).astype(np.float32) for i in range(n_aux)}}
    return build_bundle(TaskDataset.from_numpy(x, targets), _tasks(n_aux), val_size=10, test_size=10, dev_size=8, seed=0)


def _model_fn(n_aux: int, bank):
    return lambda: MultiHeadModel.for_tasks(MLP(4, hidden=(D,)), _tasks(n_aux), bank=bank)


def test_a_per_head_checkpoint_is_refused_by_a_banked_model_naming_the_layout_and_the_fix(tmp_path):
    n = 40
    bundle = _bundle(n)
    kw = dict(steps=4, eval_every=2, batch_size=8, seed=0, device="cpu", progress=False, checkpoint_dir=tmp_path)
    Trainer(_model_fn(n, False), "equal", bundle, **kw).fit()
    with pytest.raises(ckpt_io.CheckpointError) as err:
        Trainer(_model_fn(n, None), "equal", bundle, resume=True, **kw).fit()
    message = str(err.value)
    assert "one module per task head" in message and "one batched module" in message and "LinearBank" in message
    assert "retrain" in message and str(tmp_path) in message
    # the reverse too, straight from the check: a banked state for a per-head model
    with pytest.raises(ckpt_io.CheckpointError, match="stores the model's task heads as one batched module"):
        ckpt_io.check_model_layout(tmp_path / "c.pt", _model(n, None).state_dict(), _model(n, False))
    ckpt_io.check_model_layout(tmp_path / "c.pt", _model(n, None, seed=1).state_dict(), _model(n, None))  # same layout: fine


def test_a_banked_jtds_run_is_deterministic_and_matches_the_per_head_run():
    n = 40
    bundle = _bundle(n)
    kw = dict(steps=10, eval_every=5, batch_size=8, seed=0, device="cpu", progress=False)
    runs = [Trainer(_model_fn(n, bank), "jtds", bundle, **kw).fit() for bank in (None, None, False)]
    a, b, per_head = (r.history.drop(columns="seconds") for r in runs)
    assert a.equals(b)  # same seed, same numbers
    # per-head modules: the same initial weights and the same updates up to float rounding (the bank
    # sums the gradient and Adam's arithmetic over one tensor instead of 2K)
    for column in ("val_loss", "train_loss/y", "train_loss/a0", "train_loss/a39"):
        np.testing.assert_allclose(a[column].to_numpy(float), per_head[column].to_numpy(float), rtol=1e-4, err_msg=column)


def test_banked_losses_are_the_per_task_losses_and_stacked_takes_them_whole_bit_for_bit():
    n = 40
    tasks = _tasks(n)
    model = _model(n, None)
    x = torch.randn(6, 4)
    targets = {"y": torch.randint(0, 3, (6,)), **{f"a{i}": torch.randint(0, 2, (6,)).float() for i in range(n)}}
    targets["a3"][[1, 4]] = float("nan")  # missing labels: zero loss, masked
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, tasks)
    feats = model.backbone(x)
    for task in tasks:  # the truth: each head's plain linear map, then the task's own loss
        head = model.heads[task.name]
        ref = task.loss(F.linear(feats, head.weight, head.bias), targets[task.name])
        torch.testing.assert_close(terms.losses[task.name], ref, rtol=1e-6, atol=1e-7)
    assert terms.losses["a3"][[1, 4]].eq(0).all() and not terms.masks["a3"][[1, 4]].any()
    # the joint [B, K] losses against stacking the K columns: same values, same gradients, any order
    weights = torch.randn(n + 1, generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    for names in (tasks.names, ["a5", "a6", "y", "a0"]):
        loss, mask = terms.stacked(names)
        ref_loss = torch.stack([terms.losses[k] for k in names], 1)
        assert torch.equal(loss, ref_loss) and torch.equal(mask, torch.stack([terms.masks[k] for k in names], 1))
        w = weights[: len(names)]
        got = torch.autograd.grad((loss * w).sum(), params, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad((ref_loss * w).sum(), params, retain_graph=True, allow_unused=True)
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b)
    assert tuple(f"a{i}" for i in range(n)) in terms.grouped  # the bank's losses were computed together


def test_l2_penalty_selects_banked_heads_by_their_per_head_names_with_the_per_head_values_and_gradients():
    from auxnb.methods import l2_penalty

    n = MultiHeadModel.BANK_HEADS
    banked, per_head = _model(n, True, seed=5), _model(n, False, seed=5)
    # by hand: sums of squares over the per-head model's own modules
    heads_by_hand = sum(float(p.detach().pow(2).sum()) for n_, p in per_head.named_parameters() if n_.startswith("heads."))
    a3_by_hand = float(per_head.heads["a3"].weight.detach().pow(2).sum())
    assert l2_penalty("heads")(banked).item() == pytest.approx(heads_by_hand, rel=1e-6)
    assert l2_penalty("heads")(per_head).item() == pytest.approx(heads_by_hand, rel=1e-6)
    assert l2_penalty("heads.a3.weight")(banked).item() == pytest.approx(a3_by_hand, rel=1e-6)
    # the gradient of one head's penalty is 2·w on that head's row and zero on every other row
    bank = _bank(banked)
    l2_penalty("heads.a3.weight")(banked).backward()
    row = bank.index("a3")
    assert torch.allclose(bank.weight.grad[row], 2 * bank.weight.detach()[row])
    others = torch.ones(len(bank), dtype=torch.bool)
    others[row] = False
    assert bank.weight.grad[others].abs().max().item() == 0.0
    assert bank.bias.grad is None or bank.bias.grad.abs().max().item() == 0.0  # the bias is not selected


def test_a_weighted_objective_over_banked_heads_equals_the_sum_of_per_task_means_by_hand_with_missing_labels():
    from auxnb.methods import Equal, FixedWeights

    n = MultiHeadModel.BANK_HEADS
    model = _model(n, True, seed=7)
    torch.manual_seed(1)
    x = torch.randn(6, 4)
    targets = {"y": torch.randint(0, 3, (6,)), **{f"a{i}": torch.randint(0, 2, (6,)).float() for i in range(n)}}
    targets["a2"][:4] = float("nan")  # missing labels: a2's mean is over its 2 labelled samples
    targets["a5"][:] = float("nan")  # none labelled: a5's mean is 0
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, _tasks(n))
    assert terms.grouped  # the banked path is the one under test
    feats = model.backbone(x).detach()
    bank = _bank(model)
    weights = {"y": 1.0, **{f"a{i}": 0.1 * (i % 4) for i in range(n)}}
    by_hand = F.cross_entropy(model.heads["y"](feats), targets["y"]).item()
    for i in range(n):
        y, keep = targets[f"a{i}"], ~torch.isnan(targets[f"a{i}"])
        if keep.any():
            z = feats[keep] @ bank.weight.detach()[i, 0] + bank.bias.detach()[i, 0]
            by_hand += weights[f"a{i}"] * F.binary_cross_entropy_with_logits(z, y[keep]).item()
    fixed = FixedWeights({k: v for k, v in weights.items() if k != "y"})
    assert fixed.objective(terms).item() == pytest.approx(by_hand, rel=1e-5)
    equal_by_hand = sum(float(terms.losses[k].detach().sum() / terms.masks[k].sum().clamp_min(1)) for k in terms.losses)
    assert Equal().objective(terms).item() == pytest.approx(equal_by_hand, rel=1e-5)


def _mixed_tasks() -> TaskSet:
    """Two bankable shapes interleaved in task order (1-output binary and 2-class heads, 40 each)
    around a 3-class primary head that stays on its own."""
    aux = []
    for i in range(40):
        aux += [Task(f"b{i}", "binary"), Task(f"c{i}", "classification", 2)]
    return TaskSet([Task("y", "classification", 3, primary=True)] + aux)


@pytest.mark.parametrize("saved_bank,loaded_bank", [(False, None), (None, False), (None, None), (False, False)])
def test_results_saved_in_one_head_layout_load_into_the_other_and_predict_the_same(tmp_path, saved_bank, loaded_bank):
    tasks = _mixed_tasks()
    x = torch.randn(5, 4)

    def make(bank, seed):
        torch.manual_seed(seed)
        return MultiHeadModel.for_tasks(MLP(4, hidden=(D,)), tasks, bank=bank)

    saved = make(saved_bank, 0)
    with torch.no_grad():  # weights unlike any initialisation, so a wrong row cannot pass by chance
        for p in saved.parameters():
            p.copy_(torch.randn_like(p))
    saved.eval()
    with torch.no_grad():
        expected = {n: out.clone() for n, out in saved(x)[1].items()}  # forward: (features, task -> output)
    bundle = _bundle(2)
    result = Trainer(_model_fn(2, False), "stl", bundle, steps=1, batch_size=8, seed=0, device="cpu", progress=False).fit()
    result.weights = {k: v.clone() for k, v in saved.state_dict().items()}
    result.save(tmp_path / "r.pt")
    target = make(loaded_bank, 1)  # another initialisation: every value must come from the file
    assert target.banked == (loaded_bank is None) and saved.banked == (saved_bank is None)
    from auxnb.results import RunResult

    loaded = RunResult.load(tmp_path / "r.pt", target).model
    with torch.no_grad():
        outputs = loaded(x)[1]
        assert sorted(outputs) == sorted(expected) == sorted(tasks.names)
        for n in tasks.names:
            torch.testing.assert_close(outputs[n], expected[n], rtol=1e-5, atol=1e-5, msg=n)  # one fused matmul or several: rounding only
    banks = {k: tuple(v.shape) for k, v in target.state_dict().items() if k.startswith("head_banks.") and k.endswith("weight")}
    assert banks == ({"head_banks.linear0.weight": (40, 1, D), "head_banks.linear1.weight": (40, 2, D)} if loaded_bank is None else {})


def test_a_bank_of_another_model_is_refused_by_name(tmp_path):
    saved = _model(40, None)  # 40 one-output heads in a bank
    state = saved.state_dict()
    with pytest.raises(ValueError, match=r"bank 'linear0' holds 40 heads of shape 8 → 1, but this model has 35"):
        _model(35, False).adapt_head_layout(state)
