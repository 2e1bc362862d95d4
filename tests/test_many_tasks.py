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
