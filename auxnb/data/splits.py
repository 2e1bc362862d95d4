"""Split logic: train / val / test, D_dev, label fraction, k-shot and uniform label corruption.

Every function is deterministic given its seed or generator, and never corrupts or drops a
label outside the split it is given (callers pass the training split only).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from auxnb.data.core import DataBundle, TaskDataset, View, as_generator
from auxnb.tasks import MISSING_CLASS, PRIMARY_STREAM, Task, TaskSet

__all__ = [
    "split_indices",
    "carve_dev",
    "apply_label_fraction",
    "apply_shots",
    "corrupt_labels",
    "build_bundle",
    "round_half_up",
]

Seed = torch.Generator | int | None


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the rounding used for every "fraction of n" count (Python's
    `round` rounds halves to even, which would make 0.5 * 5 keep 2 but 0.5 * 7 keep 4)."""
    return int(math.floor(x + 0.5))


def _stage_generator(seed: int, stage: str) -> torch.Generator:
    # Each stage draws from its own stream so that changing, say, label_noise does not move
    # the train/val/test split or D_dev.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(stage.encode())) % (2**63))


def _class_positions(labels: Tensor, generator: torch.Generator) -> dict[int, Tensor]:
    """Positions of each class's samples, each list in random order."""
    perm = torch.randperm(len(labels), generator=generator)
    shuffled = labels[perm]
    return {int(c): perm[shuffled == c] for c in torch.unique(shuffled)}


def _stratified_order(labels: Tensor, generator: torch.Generator) -> Tensor:
    """A random order of all samples in which every run of consecutive positions holds each
    class in proportion to its frequency, to within about one sample.

    Systematic sampling: the j-th sample (random rank) of class c gets the key
    ``(j + o_c) / n_c`` with a random offset ``o_c`` in [0, 1); sorting by key interleaves
    the classes evenly.
    """
    n = len(labels)
    perm = torch.randperm(n, generator=generator)
    shuffled = labels[perm]
    # stable sort keeps the random order within each class -> rank within class
    sorted_labels, order = torch.sort(shuffled, stable=True)
    classes, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(len(classes)), counts)
    rank = torch.arange(n) - starts[group]
    offsets = torch.rand(len(classes), generator=generator, dtype=torch.float64)
    keys_sorted = (rank.double() + offsets[group]) / counts[group].double()
    keys = torch.empty(n, dtype=torch.float64)
    keys[order] = keys_sorted
    return perm[torch.sort(keys, stable=True).indices]


def _resolve_sizes(sizes: Sequence[int | float | None], n: int) -> list[int]:
    if not sizes:
        raise ValueError("sizes must name at least one part.")
    if sum(s is None for s in sizes) > 1:
        raise ValueError("At most one size may be None (meaning 'the rest').")
    for s in sizes:
        if s is None:
            continue
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TypeError(f"Split sizes must be ints (counts), floats (fractions) or None, got {s!r}.")
        if s < 0 or (isinstance(s, float) and s > 1):
            raise ValueError(f"Split size {s!r} is invalid: use a count >= 0 or a fraction in [0, 1].")
    if None not in sizes and all(isinstance(s, float) for s in sizes):
        if not math.isclose(sum(sizes), 1.0, abs_tol=1e-6):  # type: ignore[arg-type]
            raise ValueError(f"Fractions {list(sizes)} sum to {sum(sizes)}; they must sum to 1 (or use None).")
        # largest remainder, so the parts cover exactly n samples
        raw = [s * n for s in sizes]  # type: ignore[operator]
        counts = [int(math.floor(r)) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
            counts[i] += 1
        return counts
    counts = [0 if s is None else (round_half_up(s * n) if isinstance(s, float) else int(s)) for s in sizes]
    total = sum(counts)
    if total > n:
        raise ValueError(f"Split sizes {list(sizes)} need {total} samples but only {n} are available.")
    if None in sizes:
        counts[list(sizes).index(None)] = n - total
    elif total != n:
        raise ValueError(
            f"Split sizes {list(sizes)} cover {total} of {n} samples; make them add up or use None for the rest."
        )
    return counts


def split_indices(
    labels: Tensor | int,
    sizes: Sequence[int | float | None],
    *,
    stratify: bool = True,
    generator: Seed = 0,
) -> list[Tensor]:
    """Split positions ``0..N-1`` into disjoint parts, stratified by class when possible.

    Args:
        labels: the labels to stratify on (``[N]`` integer tensor; missing labels form a
            stratum of their own), or just ``N``. Float labels are split at random.
        sizes: one entry per part: an int (count), a float (fraction of N) or ``None`` (the
            rest; at most one). Without ``None`` the parts must cover all N samples
            (fractions summing to 1 are apportioned by largest remainder).
        stratify: keep class proportions in every part (each part's class counts are within
            about one sample of proportional).
        generator: `torch.Generator` or int seed.

    Returns:
        One long tensor of positions per part (in random order).

    Example:
        >>> train, val, test = split_indices(torch.arange(100) % 2, [None, 20, 0.1], generator=0)
        >>> len(train), len(val), len(test), int((torch.arange(100) % 2)[val].sum())
        (70, 20, 10, 10)
    """
    g = as_generator(generator)
    if isinstance(labels, int):
        n, labels_t = labels, None
    else:
        labels_t = torch.as_tensor(labels).cpu()
        if labels_t.dim() != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels_t.shape)}.")
        n = len(labels_t)
    counts = _resolve_sizes(sizes, n)
    can_stratify = labels_t is not None and not labels_t.is_floating_point()
    order = _stratified_order(labels_t, g) if stratify and can_stratify else torch.randperm(n, generator=g)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _target(dataset: TaskDataset, task: Task) -> Tensor:
    if task.name not in dataset.targets:
        raise KeyError(f"Task {task.name!r} has no targets in this dataset; targets are {list(dataset.targets)}.")
    return dataset.targets[task.name]


def _class_labels(dataset: TaskDataset, task: Task, what: str) -> Tensor:
    target = _target(dataset, task)
    if task.kind != "classification" or target.dim() != 1:
        raise ValueError(f"{what} needs hard class labels; task {task.name!r} is {task.kind} with targets "
                         f"of shape {tuple(target.shape)}.")
    return target


def _balanced_allocation(available: dict[int, int], size: int, generator: torch.Generator) -> dict[int, int]:
    """Split `size` over classes as evenly as capacities allow (water-filling); the last
    few samples that cannot be split evenly go to randomly chosen classes."""
    alloc = {c: 0 for c in available}
    remaining = size
    while remaining > 0:
        active = [c for c in alloc if alloc[c] < available[c]]
        share = remaining // len(active)
        if share == 0:
            pick = torch.randperm(len(active), generator=generator)[:remaining]
            for i in pick.tolist():
                alloc[active[i]] += 1
            break
        for c in active:
            add = min(share, available[c] - alloc[c])
            alloc[c] += add
            remaining -= add
    return alloc


def carve_dev(
    dataset: TaskDataset,
    size: int | None,
    task: Task,
    generator: Seed = 0,
) -> tuple[TaskDataset, TaskDataset | None]:
    """Carve D_dev out of `dataset`'s samples that carry a label for `task`.

    Classification (and binary) tasks: class-balanced, i.e. each class gets ``size // C``
    or one more, unless a class has too few labelled samples (the others then give more).
    Regression: a plain random draw. Unlabelled samples always stay in the training part.

    Returns:
        ``(train_rest, dev)``; ``dev`` is ``None`` when `size` is 0 or None.

    Raises:
        ValueError: `size` exceeds the number of labelled samples.
    """
    if size is None or size == 0:
        return dataset, None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"dev size must be a non-negative int, got {size!r}.")
    g = as_generator(generator)
    target = _target(dataset, task)
    labelled = task.labelled(target).cpu()
    n_labelled = int(labelled.sum())
    if size > n_labelled:
        raise ValueError(
            f"dev_size={size} but only {n_labelled} training samples carry a label for task {task.name!r}; "
            "lower dev_size (or raise label_fraction / shots)."
        )
    candidates = labelled.nonzero().flatten()
    stratifiable = (task.kind == "classification" and target.dim() == 1) or task.kind == "binary"
    if stratifiable:
        labels = target.cpu()[candidates].long()
        by_class = _class_positions(labels, g)
        alloc = _balanced_allocation({c: len(p) for c, p in by_class.items()}, size, g)
        chosen = torch.cat([candidates[by_class[c][: alloc[c]]] for c in sorted(by_class)])
    else:
        chosen = candidates[torch.randperm(len(candidates), generator=g)[:size]]
    in_dev = torch.zeros(len(dataset), dtype=torch.bool)
    in_dev[chosen] = True
    return dataset.subset(~in_dev), dataset.subset(in_dev)


def apply_label_fraction(
    dataset: TaskDataset,
    task: Task,
    fraction: float,
    generator: Seed = 0,
) -> TaskDataset:
    """Keep a fraction of `task`'s labels, per class, and mark the rest missing.

    Classification / binary: class c keeps exactly ``floor(fraction * n_c + 0.5)`` of its
    ``n_c`` labels, at least one when ``n_c > 0``; regression keeps that many of all labels.
    The other labels become ``MISSING_CLASS`` (NaN for real-valued tasks). Samples are kept:
    auxiliary tasks still train on them.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction!r}.")
    g = as_generator(generator)
    target = _target(dataset, task)
    labelled = task.labelled(target).cpu()
    keep = torch.zeros(len(dataset), dtype=torch.bool)
    if (task.kind == "classification" and target.dim() == 1) or task.kind == "binary":
        candidates = labelled.nonzero().flatten()
        by_class = _class_positions(target.cpu()[candidates].long(), g)
        for c in sorted(by_class):
            pos = by_class[c]
            k = max(1, round_half_up(fraction * len(pos)))
            keep[candidates[pos[:k]]] = True
    elif task.kind == "regression":
        candidates = labelled.nonzero().flatten()
        k = max(1, round_half_up(fraction * len(candidates))) if len(candidates) else 0
        keep[candidates[torch.randperm(len(candidates), generator=g)[:k]]] = True
    else:
        raise ValueError(f"label_fraction needs hard labels; task {task.name!r} has soft targets.")
    drop = (labelled & ~keep).to(target.device)
    missing = torch.tensor(MISSING_CLASS if task.kind == "classification" else math.nan, dtype=target.dtype)
    return dataset.with_targets(**{task.name: torch.where(drop, missing.to(target.device), target)})


def apply_shots(
    dataset: TaskDataset,
    task: Task,
    shots: int,
    generator: Seed = 0,
    drop_unlabelled: bool = True,
) -> TaskDataset:
    """k-shot: keep exactly `shots` labelled samples of every class ``0..out_dim-1``.

    With `drop_unlabelled` the result holds only those ``shots * C`` samples; otherwise the
    other samples stay with their label set to ``MISSING_CLASS``.

    Raises:
        ValueError: a class has fewer than `shots` labelled samples.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots!r}.")
    g = as_generator(generator)
    target = _class_labels(dataset, task, "apply_shots").cpu()
    by_class = _class_positions(target, g)
    chosen = []
    for c in range(task.out_dim):
        pos = by_class.get(c, torch.empty(0, dtype=torch.long))
        if len(pos) < shots:
            raise ValueError(
                f"{shots}-shot needs {shots} labelled samples of class {c} for task {task.name!r}, "
                f"but only {len(pos)} are available."
            )
        chosen.append(pos[:shots])
    keep = torch.zeros(len(dataset), dtype=torch.bool)
    keep[torch.cat(chosen)] = True
    if drop_unlabelled:
        return dataset.subset(keep)
    full = dataset.targets[task.name]
    return dataset.with_targets(
        **{task.name: torch.where(keep.to(full.device), full, torch.full_like(full, MISSING_CLASS))}
    )


def corrupt_labels(
    dataset: TaskDataset,
    task: Task,
    rate: float,
    num_classes: int | None = None,
    generator: Seed = 0,
) -> tuple[TaskDataset, Tensor]:
    """Uniform label noise with corruption matrix ``(1 - r) I + r / C``.

    Each present label is, with probability `rate`, replaced by a class drawn uniformly
    from all C classes, which may be the true one; so the effective flip rate (labels that
    actually change) is ``r (1 - 1/C)``. Missing labels stay missing. Callers apply this to
    the training split only: D_dev, D_val and D_test stay clean.

    Returns:
        ``(noisy_dataset, corrupted)`` where ``corrupted[i]`` is True iff sample i's label changed.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate!r}.")
    target = _class_labels(dataset, task, "corrupt_labels")
    c = task.out_dim if num_classes is None else num_classes
    if c < 2:
        raise ValueError(f"num_classes must be at least 2, got {c}.")
    g = as_generator(generator)
    n = len(target)
    replace = torch.rand(n, generator=g) < rate
    drawn = torch.randint(0, c, (n,), generator=g)
    labels = target.cpu()
    noisy = torch.where(replace & (labels != MISSING_CLASS), drawn.to(labels.dtype), labels)
    corrupted = noisy != labels
    return dataset.with_targets(**{task.name: noisy.to(target.device)}), corrupted


def check_label_protocol(primary: Task, label_fraction: float | None, shots: int | None, label_noise: float) -> None:
    """The labelled-budget knobs a bundle builder is given, checked before any work."""
    if label_fraction is not None and shots is not None:
        raise ValueError("Set label_fraction or shots, not both.")
    if label_noise and primary.kind != "classification":
        raise ValueError(f"label_noise needs a classification primary task; {primary.name!r} is {primary.kind}.")


def label_protocol(
    train: TaskDataset,
    primary: Task,
    *,
    seed: int,
    n_ids: int,
    label_fraction: float | None = None,
    shots: int | None = None,
    dev_size: int = 0,
    label_noise: float = 0.0,
    keep_unlabelled: bool = False,
    dev_carver: Any = None,
) -> tuple[TaskDataset, TaskDataset | None, Tensor | None]:
    """What every bundle builder (`build_bundle`, the settings' ``pools_bundle``) does to the training
    split after val / test are set apart, in the papers' order, each stage on its own random stream:

    1. the labelled budget: `label_fraction` (per class, others kept unlabelled) or `shots`
       (k per class; others dropped unless `keep_unlabelled`);
    2. D_dev: `dev_size` labelled samples carved from it (class-balanced, or `dev_carver(train,
       dev_size, generator)`), before any noise, so dev labels are clean;
    3. uniform label noise (`label_noise`) on the remaining training labels only;
    4. the corrupted mask: ``[n_ids]`` booleans over the source's id space (None without noise).

    Returns ``(train, dev, corrupted)``.
    """
    check_label_protocol(primary, label_fraction, shots, label_noise)
    if label_fraction is not None:
        train = apply_label_fraction(train, primary, label_fraction, _stage_generator(seed, "label_fraction"))
    if shots is not None:
        train = apply_shots(train, primary, shots, _stage_generator(seed, "shots"), drop_unlabelled=not keep_unlabelled)
    if dev_carver is not None and dev_size:
        train, dev = dev_carver(train, dev_size, _stage_generator(seed, "dev"))
    else:
        train, dev = carve_dev(train, dev_size, primary, _stage_generator(seed, "dev"))
    from auxnb.checks import check_dev_leaves_training  # D_dev must not take every labelled sample

    check_dev_leaves_training(train, dev, primary, dev_size=dev_size, shots=shots, label_fraction=label_fraction)
    corrupted: Tensor | None = None
    if label_noise:
        train, changed = corrupt_labels(train, primary, label_noise, generator=_stage_generator(seed, "noise"))
        corrupted = torch.zeros(n_ids, dtype=torch.bool)
        corrupted[train.index.cpu()[changed]] = True
    return train, dev, corrupted


def build_bundle(
    source: TaskDataset | str,
    tasks: TaskSet | Sequence[Task],
    *,
    val_size: int | float,
    test_size: int | float,
    dev_size: int,
    label_fraction: float | None = None,
    shots: int | None = None,
    label_noise: float = 0.0,
    seed: int = 0,
    views: Mapping[str, View] | None = None,
    aux_train: Mapping[str, TaskDataset] | None = None,
    stratify: bool = True,
    keep_unlabelled: bool = False,
    source_name: str | None = None,
) -> DataBundle:
    """Split a primary dataset into a `DataBundle`, in the papers' order.

    1. train / val / test split of `source` (stratified on the primary label);
    2. the labelled budget on the training split: `label_fraction` (per class, samples
       kept unlabelled) or `shots` (k per class; others dropped unless `keep_unlabelled`);
    3. D_dev (`dev_size` samples, class-balanced) carved from the *labelled* training
       samples, before any noise, so dev labels are clean and come out of the same scarce
       budget: ``for_method(False)`` gives back a train set with exactly the budget;
    4. uniform label noise (`label_noise`) on the remaining training labels only;
       ``info["corrupted"]`` flags the corrupted sample ids.

    Args:
        source: the primary dataset (targets keyed by task name); ``auxnb.data.build_bundle`` (the
            public name) also takes a registered source name (``auxnb.data.get_source``) whose
            label is stored under the primary task's name.
        val_size, test_size: counts (int) or fractions of the source (float).
        dev_size: number of D_dev samples (0: no dev split).
        seed: one int; each stage draws from its own stream derived from it.
    """
    from auxnb.data.core import as_task_dataset

    if not isinstance(tasks, TaskSet):
        tasks = TaskSet(tasks)
    primary = tasks.primary
    if isinstance(source, str):
        raise TypeError(f"auxnb.data.splits.build_bundle takes a dataset; for a registered source name ({source!r}) "
                        "use auxnb.data.build_bundle, which resolves it.")
    try:
        dataset = as_task_dataset(source, tasks)
    except TypeError as err:
        raise TypeError(f"build_bundle source: {err} Or a registered source name (auxnb.data.SOURCES).") from None
    source_name = source_name or "custom"
    check_label_protocol(primary, label_fraction, shots, label_noise)
    dataset.validate_targets(tasks.on_stream(PRIMARY_STREAM))

    labels = dataset.targets[primary.name]
    strat_labels: Tensor | int = labels.cpu() if labels.dim() == 1 else len(dataset)
    train_pos, val_pos, test_pos = split_indices(
        strat_labels, [None, val_size, test_size], stratify=stratify, generator=_stage_generator(seed, "split")
    )
    train = dataset.subset(train_pos.sort().values)
    val = dataset.subset(val_pos.sort().values) if len(val_pos) else None
    test = dataset.subset(test_pos.sort().values) if len(test_pos) else None

    train, dev, corrupted = label_protocol(
        train, primary, seed=seed, n_ids=int(dataset.index.max()) + 1 if len(dataset) else 0, label_fraction=label_fraction,
        shots=shots, dev_size=dev_size, label_noise=label_noise, keep_unlabelled=keep_unlabelled,
    )

    info: dict[str, Any] = {
        "source": source_name,
        "seed": seed,
        # the id space (ids need not be 0..N-1): N-JTDS sizes its weight table by it
        "n_source": int(dataset.index.max()) + 1 if len(dataset) else 0,
        "val_size": val_size,
        "test_size": test_size,
        "dev_size": dev_size,
        "label_fraction": label_fraction,
        "shots": shots,
        "label_noise": label_noise,
        # uniform replacement keeps the true class with probability 1/C
        "effective_flip_rate": label_noise * (1 - 1 / primary.out_dim) if label_noise else 0.0,
        "corrupted": corrupted,
        "input_columns": getattr(dataset, "columns", None),  # from_pandas's names: predict matches them
    }
    bundle = DataBundle(
        tasks=tasks,
        train=train,
        dev=dev,
        val=val,
        test=test,
        aux_train=dict(aux_train or {}),
        views=dict(views or {}),
        info=info,
    )
    bundle.info["sizes"] = bundle.describe()
    return bundle
