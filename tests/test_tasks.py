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


@pytest.mark.parametrize("kind", ["regression", "binary"])
def test_column_vector_targets_are_refused_where_targets_enter_never_broadcast(kind):
    # issue 12 defect 6: a [N, 1] target (df[["col"]].values) made the per-sample loss [N, N], so
    # Equal / MAOAL trained on N times the loss and JTDS crashed; now it is a clear error everywhere
    from auxnb.data import TaskDataset, build_bundle
    from auxnb.models import MLP, MultiHeadModel
    from auxnb.train import Trainer

    task = Task("y", kind, primary=True)
    n = 40
    y = (torch.arange(n) % 2).float()
    with pytest.raises(ValueError, match=r"shape \[N\], got \[4, 1\].*df\['col'\]\.values"):
        task.loss(torch.zeros(4, 1), y[:4, None])
    assert task.loss(torch.zeros(4, 1), y[:4]).shape == (4,)  # the [N] form still works
    data = TaskDataset(torch.randn(n, 3), {"y": y[:, None]})
    with pytest.raises(ValueError, match=r"Task 'y'.*got \[40, 1\]"):
        data.validate_targets([task])
    with pytest.raises(ValueError, match=r"Task 'y'.*got \[40, 1\]"):
        build_bundle(data, [task], val_size=8, test_size=8, dev_size=0, stratify=False)
    # a bundle built by hand: refused when the DataBundle is made, before any Trainer step
    from auxnb.data import DataBundle
    with pytest.raises(ValueError, match=r"Task 'y'.*got \[40, 1\]"):
        DataBundle(TaskSet([task]), data, val=data, test=data)
    # the numpy / pandas ways in, given the tasks, refuse it too (what df[["col"]].values gives)
    import pandas as pd

    frame = pd.DataFrame({"a": torch.randn(n).numpy(), "y": y.numpy()})
    with pytest.raises(ValueError, match=r"Task 'y'.*got \[40, 1\]"):
        TaskDataset.from_numpy(frame[["a"]].values, {"y": frame[["y"]].values}, tasks=[task])
    assert TaskDataset.from_pandas(frame, targets="y", tasks=[task]).targets["y"].shape == (n,)
    good = build_bundle(TaskDataset(torch.randn(n, 3), {"y": y}), [task], val_size=8, test_size=8, dev_size=0, stratify=False)
    model = MultiHeadModel.for_tasks(MLP(3, hidden=(4,)), TaskSet([task]))
    result = Trainer(model, "equal", good, steps=2, batch_size=8, progress=False, device="cpu").fit()
    assert math.isfinite(result.test_metric) or kind == "binary"


def test_soft_class_labels_must_match_the_number_of_classes():
    t = Task("y", "classification", 3, primary=True)
    assert t.loss(torch.zeros(2, 3), torch.full((2, 3), 1 / 3)).tolist() == pytest.approx([math.log(3)] * 2)
    with pytest.raises(ValueError, match=r"\[N, classes\]"):
        t.check_targets(torch.zeros(2, 1, dtype=torch.long))
