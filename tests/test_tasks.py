"""Tasks: validation errors, per-sample losses against hand computation, metrics against known values."""

import math

import pytest
import torch

from auxnb.tasks import MISSING_CLASS, Task, TaskSet, metric


def test_taskset_requires_exactly_one_primary():
    with pytest.raises(ValueError, match="Exactly one task must be primary"):
        TaskSet([Task("a", "classification", 3), Task("b", "classification", 3)])
    with pytest.raises(ValueError, match="found 2"):
        TaskSet([Task("a", "classification", 3, primary=True), Task("b", "classification", 3, primary=True)])


def test_taskset_rejects_duplicate_names():
    with pytest.raises(ValueError, match="Duplicate task names"):
        TaskSet([Task("a", "classification", 3, primary=True), Task("a", "binary")])


def test_unknown_kind_names_the_valid_kinds():
    with pytest.raises(ValueError, match="classification, binary, regression"):
        Task("a", "ranking")


def test_index_is_a_reserved_task_name():
    with pytest.raises(ValueError, match="reserved"):
        Task("index", "regression")


def test_classification_loss_is_cross_entropy_and_zero_where_missing():
    t = Task("y", "classification", 3, primary=True)
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    loss = t.loss(logits, torch.tensor([0, MISSING_CLASS]))
    expected = -(1.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))
    assert loss[0].item() == pytest.approx(expected, rel=1e-6)
    assert loss[1].item() == 0.0


def test_missing_label_gives_zero_gradient():
    t = Task("y", "regression")
    out = torch.tensor([[1.0], [2.0]], requires_grad=True)
    t.loss(out, torch.tensor([3.0, float("nan")])).sum().backward()
    assert out.grad.tolist() == [[-4.0], [0.0]]


def test_binary_loss_matches_logistic_formula():
    t = Task("click", "binary")
    z, y = torch.tensor([[0.3]]), torch.tensor([1.0])
    assert t.loss(z, y).item() == pytest.approx(math.log(1 + math.exp(-0.3)), rel=1e-6)


def test_label_out_of_range_is_a_clear_error():
    t = Task("y", "classification", 3, primary=True)
    with pytest.raises(ValueError, match="label 3 is out of range"):
        t.check_targets(torch.tensor([0, 3]))


def test_auc_matches_hand_computed_pairs():
    t = Task("click", "binary")
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # positive/negative pairs ordered correctly: (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3 of 4
    assert metric(t, scores[:, None], labels) == pytest.approx(0.75)


def test_auc_counts_ties_as_half():
    t = Task("click", "binary")
    assert metric(t, torch.tensor([[0.5], [0.5]]), torch.tensor([0.0, 1.0])) == pytest.approx(0.5)


def test_accuracy_ignores_missing_labels():
    t = Task("y", "classification", 2, primary=True)
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert metric(t, out, torch.tensor([0, 0, MISSING_CLASS])) == pytest.approx(0.5)


def test_rmse_by_hand():
    t = Task("r", "regression")
    assert metric(t, torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 5.0])) == pytest.approx(math.sqrt(2.5))
