"""Many auxiliary tasks (issue 14): heads in one product, binary losses in one op, same numbers."""

from __future__ import annotations

import torch

from auxnb.methods.base import compute_terms
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import PRIMARY_STREAM, Task, TaskSet


def _setup(n_aux=12, seed=0):
    torch.manual_seed(seed)
    tasks = TaskSet([Task("y", "classification", 3, primary=True)] + [Task(f"a{i}", "binary") for i in range(n_aux)])
    model = MultiHeadModel.for_tasks(MLP(4, hidden=(8,)), tasks)
    x = torch.randn(6, 4)
    targets = {"y": torch.randint(0, 3, (6,)), **{f"a{i}": torch.randint(0, 2, (6,)).float() for i in range(n_aux)}}
    targets["a3"][[1, 4]] = float("nan")  # missing labels: zero loss, zero gradient
    return tasks, model, x, targets


def test_batched_heads_equal_each_head_alone():
    tasks, model, x, _ = _setup()
    features, outs = model(x)
    for name in tasks.names:
        torch.testing.assert_close(outs[name], model.heads[name](features), rtol=1e-6, atol=1e-6)
    assert [n for n in outs] == tasks.names


def test_grouped_binary_losses_are_the_per_task_losses_bit_for_bit():
    tasks, model, x, targets = _setup()
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, tasks)
    for task in tasks:
        ref = task.loss(terms.outputs[task.name], targets[task.name])
        assert torch.equal(terms.losses[task.name], ref), task.name
        assert torch.equal(terms.masks[task.name], task.labelled(targets[task.name]))
    assert terms.losses["a3"][[1, 4]].eq(0).all()
    # gradients too: the sum of the grouped losses against the per-head, per-task computation
    params = list(model.parameters())
    grouped = torch.autograd.grad(sum(terms.losses[n].mean() for n in tasks.names), params)
    features = model.backbone(x)
    alone = sum(t.loss(model.heads[t.name](features), targets[t.name]).mean() for t in tasks)
    for a, b in zip(grouped, torch.autograd.grad(alone, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _maoal_direction(chunk, init, batched=False, create_graph=False):
    from auxnb.methods import MAOAL
    from auxnb.methods.base import SetupInfo

    tasks, model, x, targets = _setup(n_aux=10, seed=1)
    method = MAOAL(init=init, batched=batched)
    method.grad_chunk = chunk
    method.setup(model, SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=6, seed=0))
    params = [p for p in model.parameters() if p.requires_grad]
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, tasks)
    out = method.direction(terms, params, create_graph=create_graph)
    return out, method


def test_maoal_chunked_per_loss_gradients_give_the_same_direction():
    for init in (1.0, "grad-ratio"):
        for batched in (False, True):
            full, m_full = _maoal_direction(100, init, batched)  # 10 aux losses in one go
            chunked, m_chunk = _maoal_direction(3, init, batched)  # 4 chunks of at most 3
            for a, b in zip(full, chunked):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(m_full.alpha, m_chunk.alpha)  # grad-ratio init from chunked norms
            assert torch.equal(m_full._reach, m_chunk._reach)
    # the upper step's direction (graph to α) too: same value and same ∂/∂α
    full, m_full = _maoal_direction(100, 1.0, create_graph=True)
    chunked, m_chunk = _maoal_direction(3, 1.0, create_graph=True)
    ga = torch.autograd.grad(sum(g.sum() for g in full), m_full.alpha)[0]
    gb = torch.autograd.grad(sum(g.sum() for g in chunked), m_chunk.alpha)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
