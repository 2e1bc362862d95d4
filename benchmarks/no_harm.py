"""Can auxiliary learning make things worse? STL, Equal and the recommended MAOAL/JTDS/DTG beyond digits.

The sibling of ``benchmarks/low_data.py`` (issue 13): the same entries, per-run files and paired
differences, on real cases beyond digits, at the ``small`` scale of each setting:

* ``f-rotation-10%`` / ``f-rotation-20%``: Fashion-MNIST (Debian's real IDX files), 10 % / 20 % of
  the primary labels, rotation prediction as auxiliary task (MAOAL).
* ``f-noise-40%``: Fashion-MNIST, every label, 40 % of them corrupted, rotation auxiliary (JTDS).
* ``f-noise-40%-long``: the same for 10 epochs instead of 3 (issue 22: a horizon long enough for
  JTDS's loss filter to learn; its rows also carry ``batch_weight_ratio`` / ``batch_weight_auc``).
* ``f-5-shot``:     Fashion-MNIST, 5 labelled images per class, rotation auxiliary (DTG).
* ``l2-digits`` / ``l2-fashion``: the harmful-loss case: an L2 regulariser of coefficient 1 on every
  parameter (`auxnb.methods.l2_penalty`) is the only auxiliary loss (MAOAL's rating protocol).
  "Equal" is then the primary loss + 1 · L2; a method that does no harm must end near STL.
* ``mnist-10%`` (the helpful control) is low_data.py's case: its results are in low_data.csv.

Recommended methods run as ``auxnb.experiments.run(setting, name)`` does: the constructor's
defaults plus the setting's ``small``-scale method defaults (Fashion-MNIST: T = 10).
Extra entries (``--explore``) are the issue's candidate safety switches.

    python benchmarks/no_harm.py --case l2-digits                  # one case alone, seeds 0-4
    python benchmarks/no_harm.py --seeds 5 --seed-start 5          # the confirmation seeds
    python benchmarks/no_harm.py --report                          # the table of the saved CSV

Each finished run is written to its own file under ``--runs`` (resumable); runs go seed by seed
(every case's entries for seed 0, then seed 1, ...), so an interrupted run leaves paired evidence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from low_data import Entry, _after_entries, _run_path, print_tables, report  # noqa: E402  (the shared machinery)
from low_data import _after_candidates as _low_after_candidates  # noqa: E402

DEFAULT_CSV = HERE / "results" / "no_harm.csv"
DEFAULT_RUNS = HERE / "results" / "no_harm_runs"

#: case -> (setting, overrides, family of the method the case is about)
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "f-rotation-10%": ("fashion-rotation", {"label_fraction": 0.1}, "maoal"),
    "f-rotation-20%": ("fashion-rotation", {"label_fraction": 0.2}, "maoal"),
    "f-noise-40%": ("fashion-rotation", {"label_noise": 0.4}, "jtds"),
    # issue 22: the longer horizon (10 epochs, ~310 lower steps) where a loss filter has time to learn
    "f-noise-40%-long": ("fashion-rotation", {"label_noise": 0.4, "epochs": 10}, "jtds"),
    "f-5-shot": ("fashion-rotation", {"shots": 5, "dev_size": 10, "steps": 100, "eval_every": 10}, "dtg"),
    "l2-digits": ("digits-rotation", {"label_fraction": 0.1, "dev_size": 20, "epochs": 20}, "maoal"),
    "l2-fashion": ("fashion-rotation", {"label_fraction": 0.2}, "maoal"),
    # issue 22: the same question as f-noise-40%-long for MAOAL and DTG: do they learn, alone, when the run
    # leaves the upper level ~30 steps instead of ~9 (T = 10)? Run only when named (not in the default list)
    "f-rotation-10%-long": ("fashion-rotation", {"label_fraction": 0.1, "epochs": 10}, "maoal"),
    "f-5-shot-long": ("fashion-rotation", {"shots": 5, "dev_size": 10, "steps": 300, "eval_every": 10}, "dtg"),
}
#: issue 22's long-horizon probes and the short case each lengthens
HORIZON_PAIRS = {"f-rotation-10%": "f-rotation-10%-long", "f-5-shot": "f-5-shot-long"}
#: the cases a plain ``python benchmarks/no_harm.py`` runs (the long-horizon probes only when named)
DEFAULT_CASES = tuple(c for c in CASES if c not in HORIZON_PAIRS.values())
L2_CASES = ("l2-digits", "l2-fashion")
#: the rounding control's label (`_candidates`): STL + 1e-12 · L2, a change at rounding level
CONTROL_LABEL = "STL + 1e-12·L2 (rounding control)"
L2_SCALE = 1.0


def _recommended(case: str) -> list[Entry]:
    family = CASES[case][2]
    label = {"maoal": "MAOAL", "jtds": "JTDS", "dtg": "DTG"}[family]
    kwargs = {"l2": L2_SCALE} if case in L2_CASES else {}
    return [
        Entry(case, "STL", "baseline", "baseline", "stl"),
        Entry(case, "Equal", "baseline", "baseline", "equal", dict(kwargs)),
        Entry(case, f"{label} recommended", family, "recommended", family, dict(kwargs)),
    ]


def _candidates(case: str) -> list[Entry]:
    """Safety switches tried while choosing (``--explore``); see the chapter for the reasoning."""
    family = CASES[case][2]
    extra = {"l2": L2_SCALE} if case in L2_CASES else {}
    out: list[Entry] = []
    if family == "maoal":
        log = {"importance_param": "log", "upper_lr": 0.1}
        out += [
            Entry(case, "MAOAL log α", "maoal", "candidate", "maoal", {**extra, **log}),
            Entry(case, "MAOAL grad-ratio init", "maoal", "candidate", "maoal", {**extra, "init": "grad-ratio"}),
            Entry(case, "MAOAL log α + grad-ratio init", "maoal", "candidate", "maoal", {**extra, **log, "init": "grad-ratio"}),
            # issue 22: at T = 10 a `small` run has ~9 upper steps and Adam 1e-2 moves α by ≤ 0.09 in all
            Entry(case, "MAOAL upper lr 0.1", "maoal", "candidate", "maoal", {**extra, "upper_lr": 0.1}),
            # methods_learn.md §22: the Neumann series warm-started as `JTDS()`'s since §21 (β = 0.9: about K/(1 − β)
            # terms of horizon at K = 2 products a step): α's hypergradient with a longer look at the lower problem
            Entry(case, "MAOAL warm series 0.9", "maoal", "candidate", "maoal", {**extra, "warm_start": 0.9}),
        ]
        if case not in L2_CASES:
            # §22, the headroom: MAOAL's α stays within 0.93-1.07 of Equal's 1 on these cases; would a rotation weight
            # moved as far as α could move (halved, doubled; fixed, every module) have been worth learning?
            out += [Entry(case, f"Fixed rotation weight {w}", "baseline", "candidate", "fixed",
                          {"weights": {"rotation": w}}) for w in (0.5, 2.0)]
    if family == "jtds":
        out += [
            Entry(case, "JTDS down-weight only", "jtds", "candidate", "jtds", {"downweight_only": True}),
            Entry(case, "JTDS log task weights", "jtds", "candidate", "jtds", {"sigma1": "exp"}),
            Entry(case, "JTDS down-weight + log", "jtds", "candidate", "jtds", {"downweight_only": True, "sigma1": "exp"}),
            # issue 22's cost round: `JTDS()` takes K = 2 Neumann terms since (one Jᵀu product fewer per upper step,
            # the costliest pass of the upper level on this ConvNet); the default before it, for the comparison
            Entry(case, "JTDS K=3 (before)", "jtds", "candidate", "jtds", {"terms": 3}),
            # issue 22 (methods_learn.md §13, both rejected): the T = 20 that a cadence aiming at ~14 upper steps
            # after the warm-up gives the 10-epoch run, and one Neumann term
            Entry(case, "JTDS T=20", "jtds", "candidate", "jtds", {"lower_steps": 20}),
            Entry(case, "JTDS K=1", "jtds", "candidate", "jtds", {"terms": 1}),
            # methods_learn.md §14: the stored `JTDS recommended` runs took uᵀ∂g/∂φ by a double backward; the
            # default takes it by a forward-mode pass since (the same maths, rounding apart): a run-level check
            Entry(case, "JTDS forward mode", "jtds", "candidate", "jtds", {"forward_mode": True}),
            # methods_learn.md §15: λ_max for η = 1/λ_max estimated every 40 upper slots instead of 10 (once in a
            # Fashion-MNIST run of 10 epochs at T = 10, where the default estimates 4 times at 7 products each)
            Entry(case, "JTDS λ every 40", "jtds", "candidate", "jtds", {"auto_every": 40}),
            # methods_learn.md §15: α_G (the primary's α) not learned, so that σ1(α_k)/σ1(α_G) cannot grow exponentially
            Entry(case, "JTDS pinned primary", "jtds", "candidate", "jtds", {"pin_primary": True}),
            # methods_learn.md §16: with α_G pinned (the default since §15) φ's bounded step two and three times as
            # long (SGD 2e-2 / 3e-2, joint clip at 10): before the pin these broke Adam runs on digits
            *[Entry(case, f"JTDS pinned, upper lr {lr}", "jtds", "candidate", "jtds", {"upper_lr": lr}) for lr in (0.03, 0.02)],
            # ... and with half the upper steps (T = 20; §13 rejected it at upper lr 0.01, when fewer steps of the slower
            # φ lost the separation): a 3× longer φ step may need fewer of them, and T = 20 is the cheaper run
            Entry(case, "JTDS pinned, upper lr 0.03, T=20", "jtds", "candidate", "jtds", {"upper_lr": 0.03, "lower_steps": 20}),
            # a diagnostic, not a candidate: JTDS with φ never stepped (its initial weights, the same hypergradients
            # computed and thrown away), i.e. what JTDS's weighting does before it has learned anything
            Entry(case, "JTDS frozen φ", "jtds", "candidate", "jtds", {"upper_lr": 0.0}),
            # methods_learn.md §16: the hypergradient's norm (authors' series without the leading η: ×λ_max) follows
            # the lower problem's curvature, ~5 here and 0.2-1.2 on digits under SGD; scaled to norm 5 at every
            # upper step, φ's step is 0.05 long (before momentum) on both
            Entry(case, "JTDS fixed step 0.05", "jtds", "candidate", "jtds", {"clip_mode": "fixed", "clip": 5.0}),
            # methods_learn.md §16.4: over 3 epochs JTDS with φ frozen is already below Equal, which trains on the 50
            # clean D_dev images that JTDS keeps for its upper level; `refit` freezes φ after 2/3 of the run and gives
            # D_dev back to θ for the rest (on top of the default since §16)
            Entry(case, "JTDS refit 0.67", "jtds", "candidate", "jtds", {"refit": 0.67}),
            # methods_learn.md §20: θ trains on D_train ∪ D_dev from the start (STL's and Equal's training set, so the
            # lower batches are theirs of the same seed) while φ still learns from D_dev; and φ frozen with it (what
            # the weighting costs before it has learned anything, without the 50 images' cost)
            Entry(case, "JTDS dev in train", "jtds", "candidate", "jtds", {"dev_in_train": True}),
            Entry(case, "JTDS frozen φ, dev in train", "jtds", "candidate", "jtds", {"upper_lr": 0.0, "dev_in_train": True}),
            # methods_learn.md §21: uᵀ∂g/∂φ averaged over 4 training batches instead of the upper step's one (the
            # loss filter's slope is decided by 64 samples' weights, and one batch's sign is close to a coin flip)
            Entry(case, "JTDS φ on 4 batches", "jtds", "candidate", "jtds", {"phi_batches": 4}),
            Entry(case, "JTDS φ on 4 batches, dev in train", "jtds", "candidate", "jtds", {"phi_batches": 4, "dev_in_train": True}),
            # §21: the Neumann series warm-started from β × the previous upper step's u (K = 2 matvecs a step as before;
            # about K/(1 − β) terms where J and v change little): the filter's short horizon, at no extra cost
            Entry(case, "JTDS warm series 0.9", "jtds", "candidate", "jtds", {"warm_start": 0.9}),
            Entry(case, "JTDS warm series 0.5", "jtds", "candidate", "jtds", {"warm_start": 0.5}),
            Entry(case, "JTDS cold series", "jtds", "candidate", "jtds", {"warm_start": 0.0}),  # `JTDS()` until §21
            # §22: the first φ update after the 40-step warm-up still had K = 2's horizon (no earlier u to start from);
            # `warmup_series` solves and keeps the series in the warm-up's upper slots too (no product into φ)
            Entry(case, "JTDS series through warm-up", "jtds", "candidate", "jtds", {"warmup_series": True}),
        ]
    if family == "dtg":  # issue 22 (scope 4): why DTG alone does not use an auxiliary task that helps at 5 shots
        out += [
            Entry(case, "DTG upper on D_dev", "dtg", "candidate", "dtg", {"upper_data": "dev"}),
            Entry(case, "DTG init weight 1", "dtg", "candidate", "dtg", {"init_weight": 1.0}),
            Entry(case, "DTG frozen φ", "dtg", "candidate", "dtg", {"bilevel": False}),
            Entry(case, "DTG upper lr 0.1", "dtg", "candidate", "dtg", {"upper_lr": 0.1}),
            # the given auxiliary task starts where Equal has it (w_i = 1; w_g stays at 0.01): the upper level
            # then only has to move w_i down where the task hurts (in 10 upper steps w moves by <= 0.1)
            Entry(case, "DTG aux weight 1", "dtg", "candidate", "dtg", {"aux_init_weight": 1.0}),
            Entry(case, "DTG aux weight 0.3", "dtg", "candidate", "dtg", {"aux_init_weight": 0.3}),
            # the weights' hypergradient has the right sign on both datasets (up on Fashion, down on digits)
            # but Adam 1e-2 moves them <= 0.1 in ten upper steps: the weights alone get a faster rate
            Entry(case, "DTG weight lr 0.05", "dtg", "candidate", "dtg", {"weight_lr": 0.05}),
            Entry(case, "DTG aux weight 0.3, weight lr 0.05", "dtg", "candidate", "dtg", {"aux_init_weight": 0.3, "weight_lr": 0.05}),
            # issue 22's cost round: `DTG()` takes K = 2 Neumann terms since; the default before it (the paper's K)
            Entry(case, "DTG K=3 (before)", "dtg", "candidate", "dtg", {"terms": 3}),
            # one Neumann term: two products per upper step instead of three (the product into φ runs through
            # the generator and costs as much as a Jᵀu product); at five shots DTG's φ barely moves
            Entry(case, "DTG K=1", "dtg", "candidate", "dtg", {"terms": 1}),
            # methods_learn.md §19: with its weights at 0 and no upper step DTG trains θ exactly as STL does, but
            # the rotated images it forwards for the generator's sources still move BatchNorm's running statistics,
            # which evaluation uses; here they leave them alone (the trainer's `freeze_aux_buffers`)
            Entry(case, "DTG clean BN statistics", "dtg", "candidate", "dtg", {}, {"freeze_aux_buffers": True}),
            # methods_learn.md §22: the warm-started series of `JTDS()` (§21) for DTG's task weights and generator
            Entry(case, "DTG warm series 0.9", "dtg", "candidate", "dtg", {"warm_start": 0.9}),
        ]
    # the control: how far apart two runs land that differ at rounding level (STL + 1e-12 · L2); judged
    # like a method, it shows what the verdicts give a method that is STL up to rounding
    out.append(Entry(case, CONTROL_LABEL, "baseline", "candidate", "equal", {"l2": 1e-12}))
    return out


def _after(case: str) -> list[Entry]:
    """The methods of issue 24 ("after the three papers"), constructor defaults, trained alone (``--after``):
    `low_data._after_entries` on this case. Not on the L2 cases: there the regulariser is the only auxiliary
    loss (``aux_tasks=[]``), which these constructors do not take (ForkMerge would be
    ``branches=["primary", {<primary>: 1}]`` with the L2 loss)."""
    return [] if case in L2_CASES else _after_entries(case)


def _after_candidates(case: str) -> list[Entry]:
    """``--after --explore``: issue 24's question why AuxiNash and Auto-Lambda do harm, and ForkMerge's Δt
    (`low_data._after_candidates` on this case). Their upper level reads D_dev, which the harness carves
    out of the labelled training pool (50 of the 200 labels of ``f-rotation-10%``)."""
    return [] if case in L2_CASES else _low_after_candidates(case)


#: cases whose test set is a pool of its own (Fashion-MNIST's official 10,000 test images), so that evaluating on
#: all of it (``--full-test``) changes nothing in training; digits' test images come out of the same 1,797 as the
#: training ones, so there a larger test set would be a smaller training set
FULL_TEST_CASES = frozenset(c for c, (setting, _, _) in CASES.items() if setting == "fashion-rotation")


def full_test(entry: Entry) -> Entry:
    """The entry evaluated on the whole test pool (``test_size=None``): the same training, a 10× larger D_test.

    Its key differs from the entry's (the override is part of it), so its runs never mix with the sampled ones."""
    if entry.case not in FULL_TEST_CASES:
        raise ValueError(f"--full-test: case {entry.case!r} draws its test images from its training pool, so a larger "
                         f"test set would change the training data; use it with {', '.join(sorted(FULL_TEST_CASES))}")
    return replace(entry, overrides={**entry.overrides, "test_size": None})


def entries(explore: bool = False, after: bool = False) -> list[Entry]:
    out: list[Entry] = []
    for case in CASES:
        out += _recommended(case)
        if explore:
            out += _candidates(case)
        if after:
            out += _after(case)
        if after and explore:
            out += _after_candidates(case)
    return out


def _plus_l2(scale: float):
    """The "Equal" of an L2 case: the primary loss + scale · L2 (every parameter), nothing learned."""
    from auxnb.methods import STL, l2_penalty

    penalty = l2_penalty(scale=scale)

    class EqualL2(STL):
        name = "equal"

        def objective(self, terms):
            return terms.mean(terms.primary) + penalty(self._model, terms)

    return EqualL2()


#: JTDS candidates recorded while JTDS() learned the primary's α_G (`pin_primary=False`, the default before 2026-12-07;
#: methods_learn.md §15): `make_method` spells it out, so that a label keeps the meaning of its recorded runs
LEARNED_G = frozenset({"JTDS down-weight only", "JTDS log task weights", "JTDS down-weight + log", "JTDS K=3 (before)",
                       "JTDS T=20", "JTDS K=1", "JTDS forward mode", "JTDS λ every 40"})
#: JTDS candidates recorded while JTDS() clipped the hypergradient at norm 10 (`clip_mode="max"`, the default before
#: methods_learn.md §16; since then it is scaled to norm 5): `make_method` spells that out too
CLIP10 = LEARNED_G | frozenset({"JTDS pinned primary", "JTDS pinned, upper lr 0.03", "JTDS pinned, upper lr 0.02",
                                "JTDS pinned, upper lr 0.03, T=20", "JTDS frozen φ"})
#: JTDS entries of the warm-started series' era (methods_learn.md §21: `JTDS()` has ``warm_start=0.9``); every other
#: JTDS entry was recorded with the series started afresh and `make_method` spells ``warm_start=0`` out for it
WARM_SERIES = frozenset({"JTDS recommended", "JTDS warm series 0.9", "JTDS warm series 0.5", "JTDS cold series",
                         "JTDS series through warm-up"})


def make_method(entry: Entry, scale: str):
    """The method object of an entry: constructor defaults + the setting's scale defaults + the entry's kwargs."""
    from auxnb.experiments import get_setting
    from auxnb.methods import get, l2_penalty

    setting = CASES[entry.case][0]
    kwargs = dict(entry.kwargs)
    if entry.label in LEARNED_G:
        kwargs = {"pin_primary": False, **kwargs}
    if entry.label in CLIP10:
        kwargs = {"clip": 10.0, "clip_mode": "max", **kwargs}
    if entry.method.startswith("jtds") and entry.label not in WARM_SERIES:
        kwargs = {"warm_start": 0.0, **kwargs}
    l2 = kwargs.pop("l2", None)
    if entry.method == "stl":
        return get("stl")
    if entry.method == "equal":
        return _plus_l2(l2) if l2 is not None else get("equal")
    defaults = dict(get_setting(setting).method_defaults.get(entry.method, {}).get(scale, {}))
    # every bi-level run here is the method alone (`run_one` passes guard=None); the guard is
    # applied afterwards by `with_guard`, from the same STL and Equal runs
    if l2 is not None:  # the regulariser is the only auxiliary loss
        kwargs.update(aux_tasks=[], aux_losses={"l2": l2_penalty(scale=l2)})
    return get(entry.method, **{**defaults, **kwargs})


def run_one(entry: Entry, seed: int, scale: str) -> dict[str, Any]:
    """Train one entry on one seed (one thread, CPU)."""
    import torch

    torch.set_num_threads(1)
    from auxnb.experiments import run

    setting, overrides, _ = CASES[entry.case]
    overrides = {**overrides, **entry.overrides}
    t0 = time.perf_counter()
    result = run(setting, make_method(entry, scale), seed=seed, scale=scale, device="cpu", progress=False, guard=None,
                 **overrides)
    row: dict[str, Any] = {
        "case": entry.case, "label": entry.label, "family": entry.family, "role": entry.role, "opt": entry.opt,
        "method": entry.method, "kwargs": json.dumps(entry.kwargs, sort_keys=True),
        "overrides": json.dumps(entry.overrides, sort_keys=True), "seed": seed, "scale": scale,
        "val": result.val_metric, "test": result.test_metric, "best_step": result.best_step,
        "steps": result.config["steps"], "seconds": time.perf_counter() - t0,
    }
    last = result.trace[-1] if result.trace else {}
    for key, value in last.items():
        if key in ("weight_corrupted", "weight_clean", "weight_auc", "batch_weight_corrupted", "batch_weight_clean",
                   "batch_weight_ratio", "batch_weight_auc") or key.startswith("importance/"):
            row[key] = value
        if key.startswith("weight/"):  # DTG's task weights w_i, w_g: at the end, and their largest value in the run
            row[key] = float(value)
            row[f"max {key}"] = max(float(r[key]) for r in result.trace if key in r)
    return row


def collect(selected: list[Entry], seeds: list[int], scale: str, runs: Path, jobs: int, run_missing: bool = True) -> pd.DataFrame:
    """Run what is missing (seed-major), then read every finished run of `selected` × `seeds` back."""
    runs.mkdir(parents=True, exist_ok=True)
    todo = [(e, s) for s in seeds for e in selected if run_missing and not _run_path(runs, e, s, scale).exists()]

    def save(e: Entry, s: int, row: dict[str, Any]) -> None:
        path = _run_path(runs, e, s, scale)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, default=float))
        os.replace(tmp, path)
        print(f"{e.case:15s} {e.label:34s} seed {s}: test {row['test']:.4f} ({row['seconds']:.0f} s)", flush=True)

    if jobs <= 1:
        for e, s in todo:
            save(e, s, run_one(e, s, scale))
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_one, e, s, scale): (e, s) for e, s in todo}
            for future in as_completed(futures):
                save(*futures[future], future.result())
    rows = [json.loads(p.read_text()) for e in selected for s in seeds if (p := _run_path(runs, e, s, scale)).exists()]
    return pd.DataFrame(rows)


#: the guard's margins compared while choosing (seeds 0-4); `--margins` prints the comparison
MARGINS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.03)


def unguarded(table: pd.DataFrame) -> pd.DataFrame:
    """The run files' ``"<X> recommended"`` rows are the method with the guard off (``fallback=None``):
    relabel them ``"<X>, guard off"`` (role ``"unguarded"``); `with_guard` derives the recommended run."""
    table = table.copy()
    raw = table["role"] == "recommended"
    table.loc[raw, "label"] = table.loc[raw, "label"].str.replace(" recommended", ", guard off", regex=False)
    table.loc[raw, "role"] = "unguarded"
    return table


def read_runs(csv: Path | str) -> pd.DataFrame:
    """The trained runs of a saved table (`main`'s ``--csv``), as `collect` returns them: the derived
    (guarded) rows dropped, the unguarded ones under their run-file labels; `with_guard` re-derives."""
    table = pd.read_csv(csv)
    table = table[~table["role"].isin(("guarded", "recommended"))].copy()
    unguarded = table["role"] == "unguarded"
    table.loc[unguarded, "label"] = table.loc[unguarded, "label"].str.replace(", guard off", " recommended", regex=False)
    table.loc[unguarded, "role"] = "recommended"
    return table.reset_index(drop=True)


def with_guard(table: pd.DataFrame, margin: float | None = None) -> pd.DataFrame:
    """`table` (run files) plus the guarded runs, derived without training anything more:

    * ``"<X> recommended"``: the constructors' default, ``fallback="stl+equal"`` with
      ``fallback_margin=margin`` (default `auxnb.methods.guard.DEFAULT_MARGIN`): per seed the
      method's run unless STL or Equal is within the margin on D_val (`auxnb.report.select_by_val`);
    * ``"<X> + guard (STL)"``: ``fallback="stl"``, the same margin;
    * ``"<candidate> + guard"``: each ``--explore`` candidate under the default guard.

    Each is exactly what the method returns with that guard (same seed, the same trainings;
    tests/test_no_harm.py checks the identity through the Trainer, L2 cases included: the guard's
    Equal carries the method's extra losses at weight 1, which is this benchmark's Equal). Their
    ``seconds`` are the sum of the runs the guard trains."""
    from auxnb.methods.guard import DEFAULT_MARGIN
    from auxnb.report import select_by_val

    margin = DEFAULT_MARGIN if margin is None else margin
    table = unguarded(table)
    parts = [table]
    for _, group in table.groupby(["case", "opt"], sort=False):
        for label in dict.fromkeys(group.loc[group["role"].isin(("unguarded", "candidate")), "label"]):
            base = label.replace(", guard off", "")
            guarded = {
                (f"{base} recommended" if label.endswith(", guard off") else f"{label} + guard"): ["STL", "Equal"],
                **({f"{base} + guard (STL)": ["STL"]} if label.endswith(", guard off") else {}),
            }
            for name, fallbacks in guarded.items():
                chosen = select_by_val(group, [label, *fallbacks], name, by=(), margin=margin)
                if len(chosen):
                    role = "recommended" if name.endswith(" recommended") else "guarded"
                    parts.append(chosen.assign(role=role))
    return pd.concat(parts, ignore_index=True)


def verdict_grid(runs: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Method × case grid of `auxnb.report.no_harm_table`'s verdicts on `runs` (run files of one or more
    cases): each cell is the paired mean Δ (points) to the better of STL and Equal, the verdict (0.5-point
    tolerance) and "!" where a seed ends more than 5 points below STL; rows in `order` when given."""
    from auxnb.report import no_harm_table

    verdicts = no_harm_table(runs, ("STL", "Equal"), by=("case",), tolerance=0.5, collapse=5.0)
    cell = (verdicts["mean"].map("{:+.1f}".format) + " " + verdicts["verdict"]
            + verdicts["collapsed"].map({True: " !", False: ""}))
    grid = verdicts.assign(cell=cell).pivot(index="method", columns="case", values="cell")
    if order is not None:
        grid = grid.reindex(index=[o for o in order if o in grid.index])
    return grid.fillna("")


def _complete(runs: pd.DataFrame, n: int) -> pd.DataFrame:
    """The rows of the (case, seed) pairs that have all `n` entries (paired comparisons only)."""
    return runs[runs.groupby(["case", "seed"])["label"].transform("nunique") == n]


def horizon_table(runs: pd.DataFrame, pairs: dict[str, str] | None = None, seeds=range(0, 10)) -> pd.DataFrame:
    """Each short case beside its long-horizon probe (`HORIZON_PAIRS`), for the method alone (`read_runs`
    rows: STL, Equal and ``"<X> recommended"``, paired by seed): lower steps, the paired Δ to the better
    baseline with its verdict and worst seed against STL (`goals`), STL − Equal (points), what φ ends at
    (MAOAL: the range of α(rotation) over conv1–4; DTG: w_rotation's range and w_generated's peak) and the
    median wall clock × Equal."""
    pairs = HORIZON_PAIRS if pairs is None else pairs
    cases = [c for pair in pairs.items() for c in pair]
    runs = runs[runs["case"].isin(cases) & runs["seed"].isin(list(seeds)) & runs["role"].isin(["baseline", "recommended"])]
    runs = _complete(runs, 3)
    verdict = goals(runs).set_index("case")
    rows = []
    for case in cases:
        sub = runs[runs["case"] == case]
        method = sub[sub["role"] == "recommended"]
        if method["method"].iloc[0] == "maoal":
            alpha = method[[c for c in method if c.startswith("importance/rotation/conv")]].to_numpy()
            learned = f"α(rotation, conv1–4) {alpha.min():.2f}–{alpha.max():.2f}"
        else:
            learned = (f"w_rotation {method['weight/rotation'].min():.2f}–{method['weight/rotation'].max():.2f}, "
                       f"w_generated ≤ {method['max weight/generated'].max():.2f}")
        test = sub.pivot_table(index="seed", columns="label", values="test")
        seconds = sub.pivot_table(index="seed", columns="label", values="seconds")
        label = method["label"].iloc[0]
        rows.append({"case": case, "lower steps": int(method["steps"].iloc[0]), "seeds": int(verdict.loc[case, "n"]),
                     "Δ better baseline": verdict.loc[case, "mean"], "worst vs STL": verdict.loc[case, "worst"],
                     "verdict": verdict.loc[case, "verdict"], "STL − Equal": (test["STL"] - test["Equal"]).mean() * 100,
                     "φ at the end": learned, "time ×Equal": (seconds[label] / seconds["Equal"]).median()})
    return pd.DataFrame(rows).set_index("case").round(2)


def control_verdicts(runs: pd.DataFrame, blocks: dict[str, range] | None = None) -> pd.DataFrame:
    """The rounding control (`CONTROL_LABEL`) judged like a method (`goals`: the paired Δ to the better of
    STL and Equal, STL on the L2 cases, its worst seed against STL and the verdict), per case and per block of
    seeds (default 0–9 and 10–14). `runs`: STL, Equal and the control's run rows (`goals` pairs them: seeds
    without all three are left out)."""
    blocks = {"0–9": range(0, 10), "10–14": range(10, 15)} if blocks is None else blocks
    runs = runs[runs["label"].isin(["STL", "Equal", CONTROL_LABEL])]
    runs = runs.assign(role=runs["role"].where(runs["label"] != CONTROL_LABEL, "recommended"))
    rows: dict[str, dict[str, Any]] = {}
    for name, seeds in blocks.items():
        for case, r in goals(runs[runs["seed"].isin(list(seeds))]).set_index("case").iterrows():
            row = rows.setdefault(case, {})
            row[f"Δ better baseline {name}"], row[f"worst vs STL {name}"] = r["mean"], r["worst"]
            row[f"verdict {name}"] = r["verdict"]
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("case")


def _label_matches(label: str, pattern: str) -> bool:
    """``--labels``: a pattern is a prefix of the label, or (ending in ``$``) the whole label."""
    return label == pattern[:-1] if pattern.endswith("$") else label.startswith(pattern)


def seeds_needed(runs: pd.DataFrame, labels: list[str] | None = None, half_width: float = 0.5,
                 z: float = 1.96, reference: str = "STL") -> pd.DataFrame:
    """How many paired seeds a verdict with the goals' 0.5-point tolerance needs, per case: for each
    entry (`labels`; default every entry but the reference) the spread over seeds of its paired difference to
    `reference` (STL by default; its mean, worst seed and SD, points, over every seed both ran) and the seeds n for which the normal 95 %
    interval of the paired mean, ±z·SD/√n, is at most ±`half_width`: n = ⌈(z·SD / half_width)²⌉. The rounding
    control's row is the noise floor of the case: what any comparison with STL carries when nothing is learned."""
    import math

    rows = []
    for case, group in runs.groupby("case", sort=False):
        wide = group.pivot_table(index="seed", columns="label", values="test") * 100
        if reference not in wide:
            continue
        for label in labels if labels is not None else [c for c in wide.columns if c != reference]:
            if label not in wide:
                continue
            diff = (wide[label] - wide[reference]).dropna()
            if len(diff) < 2:
                continue
            sd = float(diff.std(ddof=1))
            rows.append({"case": case, "entry": label, "seeds": len(diff), f"mean Δ {reference}": round(float(diff.mean()), 2),
                         f"worst Δ {reference}": round(float(diff.min()), 2), f"SD of Δ {reference}": round(sd, 2),
                         f"seeds for ±{half_width:g} (95 %)": math.ceil((z * sd / half_width) ** 2)})
    return pd.DataFrame(rows)


def same_models(sampled: pd.DataFrame, whole: pd.DataFrame, aliases: dict[str, str] | None = None) -> pd.DataFrame:
    """The runs that are one trained model evaluated twice: on the scale's test sample (`sampled`, e.g. 1,000
    Fashion-MNIST images) and on the whole test pool (`whole`, ``--full-test``: all 10,000).

    Rows are paired by case, seed and label (a label of `whole` is looked up in `sampled` under ``aliases[label]``
    where given: the same configuration recorded under another name) and kept only where D_val's metric (to 1e-6)
    and the best step agree, which is what one model gives and two training paths practically never do (a run
    repeated on another machine may part at rounding level). Returns case, label, seed, ``sampled`` and ``whole``
    (test metric, points) and ``error`` = sampled − whole: the test sample's own error on that model."""
    aliases = aliases or {}
    key = ["case", "label", "seed"]
    right = whole[key + ["val", "best_step", "test"]].copy()
    right["label_sampled"] = right["label"].map(lambda label: aliases.get(label, label))
    left = sampled[key + ["val", "best_step", "test"]].rename(columns={"label": "label_sampled"})
    both = right.merge(left, on=["case", "label_sampled", "seed"], suffixes=("", "_sampled"))
    one_model = ((both["val"] - both["val_sampled"]).abs() < 1e-6) & (both["best_step"] == both["best_step_sampled"])
    out = both[one_model].assign(sampled=lambda d: d["test_sampled"] * 100, whole=lambda d: d["test"] * 100)
    out["error"] = out["sampled"] - out["whole"]
    # a sampled table assembled from two records may hold the same model twice (a run repeated to the bit)
    return out[key + ["sampled", "whole", "error"]].drop_duplicates(key).reset_index(drop=True)


def spread_by_test_set(pairs: pd.DataFrame, entry: dict[str, str], reference: str = "STL", n_sample: int = 1_000,
                       n_whole: int = 10_000) -> pd.DataFrame:
    """Per case, how much of a paired difference's spread is the test sample (`pairs`: `same_models`' rows).

    For the case's method (``entry[case]``, a label) and `reference`, over the seeds where both are one model on
    both test sets: the SD over seeds of method − reference on the sample and on the whole pool, and the SD of the
    change between the two (what the sample adds to each seed's difference). Also the SD of every run's own
    sample error (``error``) beside the binomial prediction √(p(1 − p)/n · (N − n)/(N − 1)) for a simple random
    draw of n = `n_sample` of N = `n_whole` images at the runs' mean accuracy p (a draw stratified by class, as the
    settings' is, can only be a little tighter)."""
    import math

    rows = []
    for case, group in pairs.groupby("case", sort=False):
        n, big, p = n_sample, n_whole, group["whole"].mean() / 100
        row = {"case": case, "runs": len(group), "SD of sample error": round(float(group["error"].std(ddof=1)), 2),
               "binomial SD": round(100 * math.sqrt(p * (1 - p) / n * (big - n) / (big - 1)), 2)}
        method = entry.get(case)
        wide = group.pivot_table(index="seed", columns="label", values=["sampled", "whole"])
        if method is not None and ("sampled", method) in wide and ("sampled", reference) in wide:
            d_sample = (wide[("sampled", method)] - wide[("sampled", reference)]).dropna()
            d_whole = (wide[("whole", method)] - wide[("whole", reference)]).dropna()
            if len(d_sample) >= 2:
                row.update({"method": method, "seeds": len(d_sample),
                            f"SD of Δ {reference}, sample": round(float(d_sample.std(ddof=1)), 2),
                            f"SD of Δ {reference}, whole": round(float(d_whole.std(ddof=1)), 2),
                            "SD of the change": round(float((d_sample - d_whole).std(ddof=1)), 2)})
        rows.append(row)
    return pd.DataFrame(rows)


def margins(table: pd.DataFrame, values: tuple[float, ...] = MARGINS) -> pd.DataFrame:
    """How the default guard (STL, Equal) does with each margin: per case, the paired mean Δ (points)
    to the better of STL and Equal (STL on the L2 cases) and the worst seed; the evidence behind
    `auxnb.methods.guard.DEFAULT_MARGIN` (chosen on seeds 0-4)."""
    from auxnb.report import no_harm_table

    rows = []
    for margin in values:
        t = with_guard(table, margin)
        t = t[t["role"].isin(("baseline", "recommended"))]
        out = no_harm_table(t, ("STL", "Equal"), reference={c: "STL" for c in L2_CASES}, tolerance=0.5, collapse=5.0)
        out = out[~out["method"].isin(("STL", "Equal"))]
        for _, r in out.iterrows():
            rows.append({"margin": margin, "case": r["case"], "method": r["method"], "n": r["n"],
                         "Δ": round(r["mean"], 2), "worst vs STL": round(r["worst"], 2)})
    wide = pd.DataFrame(rows).pivot_table(index=["case", "method"], columns="margin", values="Δ", aggfunc="first")
    wide.loc[("all cases", "mean"), :] = wide.mean()
    wide.loc[("all cases", "min"), :] = wide.iloc[:-1].min()
    wide.columns = [f"margin {m:g}" for m in wide.columns]
    return wide.round(2).reset_index()


#: what JTDS learned (per-sample weights of corrupted and clean samples): its own run's, whichever run
#: the guard keeps (the method is trained either way)
LEARNED = ("weight_corrupted", "weight_clean")


def as_default(frame: pd.DataFrame, by: tuple[str, ...] = ("case", "opt")) -> pd.DataFrame:
    """A `low_data.py` table with each recommended entry's runs replaced by what its constructor
    returns since issue 13: the same runs under the default guard (``fallback="stl+equal"``,
    `auxnb.methods.guard.DEFAULT_MARGIN`), seed by seed; the `LEARNED` columns stay the method's own."""
    from auxnb.methods.guard import DEFAULT_MARGIN
    from auxnb.report import select_by_val

    parts = [frame[frame["role"] != "recommended"]]
    for _, group in frame.groupby(list(by), sort=False):
        for label in dict.fromkeys(group.loc[group["role"] == "recommended", "label"]):
            kept = select_by_val(group, [label, "STL", "Equal"], label, by=(), margin=DEFAULT_MARGIN)
            own = group[group["label"] == label].set_index("seed")
            for col in [c for c in LEARNED if c in own]:
                kept[col] = kept["seed"].map(own[col])
            parts.append(kept.assign(role="recommended"))
    return pd.concat(parts, ignore_index=True)


def digits_verdicts(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Side by side, for each `low_data.py` table in `frames` (name -> table): each recommended
    entry's paired Δ to the better of STL and Equal, its verdict (±0.5) and its worst seed vs STL."""
    from auxnb.report import no_harm_table

    parts = []
    for name, frame in frames.items():
        keep = frame[frame["label"].isin(["STL", "Equal"]) | (frame["role"] == "recommended")].assign(
            group=lambda f: f["case"] + " (" + f["opt"] + ")")
        out = no_harm_table(keep, ("STL", "Equal"), by=("group",))
        out = out[~out["method"].isin(["STL", "Equal"])].rename(columns={"group": "case"}).set_index(["case", "method"])
        parts.append(out[["mean", "verdict", "worst"]].rename(columns={
            "mean": f"Δ {name}", "verdict": f"verdict {name}", "worst": f"worst seed vs STL {name}"}))
    return pd.concat(parts, axis=1).round(2)


def goals(table: pd.DataFrame) -> pd.DataFrame:
    """Issue 13's goals per (case, method), paired by seed (`auxnb.report.no_harm_table`): the paired
    mean to the better of STL and Equal (to STL on the harmful-L2 cases), the verdict with a 0.5-point
    tolerance, whether it is above both, and the worst single seed against STL (collapse: 5 points)."""
    from auxnb.report import no_harm_table

    out = no_harm_table(table, ("STL", "Equal"), reference={c: "STL" for c in L2_CASES}, tolerance=0.5, collapse=5.0)
    out["no harm (Δ ≥ -0.5)"] = out["mean"] >= -0.5
    return out.round(2)


#: the seed blocks of issue 22's verdicts: the seeds the configurations were chosen on, and the fresh ones
BLOCKS = {"0–9": range(0, 10), "10–14": range(10, 15)}


def verdicts(both: pd.DataFrame, blocks: dict[str, range] | None = None) -> pd.DataFrame:
    """Issue 22's table, one row per case: for each seed block (`BLOCKS`) the method alone's paired mean Δ to the
    better baseline (`goals`: to STL on the L2 cases), its guarded run's beside it, the worst seed alone against STL
    and the verdict alone. `both` is `with_guard`'s output: ``"<X>, guard off"`` rows are the method alone,
    ``"<X> recommended"`` its guarded run; a block none of whose seeds ran is left out."""
    rows: dict[str, dict[str, Any]] = {}
    for name, seeds in (blocks or BLOCKS).items():
        part = both[both["seed"].isin(seeds)]
        if part.empty:
            continue
        for (case, method), r in goals(part).set_index(["case", "method"]).iterrows():
            kind = "alone" if method.endswith(", guard off") else "guarded" if method.endswith(" recommended") else None
            if kind:
                row = rows.setdefault(case, {"method": method.split(",")[0].split(" ")[0]})
                row[f"{kind} {name}"] = r["mean"]
                if kind == "alone":
                    row[f"worst alone vs STL {name}"] = r["worst"]
                    row[f"verdict alone {name}"] = r["verdict"]
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("case")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", "--cases", dest="cases", default=None,
                        help="comma-separated cases (one: run it alone; default: every default case, its Fashion-MNIST ones "
                             "with --full-test)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (default 0; the confirmation uses 5)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each; default 1)")
    parser.add_argument("--scale", default="small")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="directory of per-run results (resumable)")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="where the collected table is written")
    parser.add_argument("--explore", action="store_true", help="also run the candidate safety switches")
    parser.add_argument("--after", action="store_true",
                        help="also run issue 24's methods (ForkMerge, AuxiNash, Auto-Lambda, UPGrad; the last needs auxnb[aggregators])")
    parser.add_argument("--labels", default="", help="keep only entries whose label starts with one of these "
                        "(comma-separated; one ending in $ must match whole: \"STL$\" leaves out the rounding control)")
    parser.add_argument("--full-test", action="store_true",
                        help="evaluate on all 10,000 Fashion-MNIST test images instead of the scale's 1,000 (same training; "
                             "the runs are kept apart from the sampled ones; use its own --csv)")
    parser.add_argument("--report", action="store_true", help="only print the table of --csv")
    parser.add_argument("--collect-only", action="store_true", help="run nothing: collect the finished runs into --csv")
    parser.add_argument("--margins", action="store_true", help="also print the default guard's Δ for each margin in MARGINS")
    args = parser.parse_args(argv)

    if args.report:
        table = read_runs(args.csv)
    else:
        if args.cases is None:
            args.cases = ",".join(c for c in DEFAULT_CASES if not args.full_test or c in FULL_TEST_CASES)
        cases = [c for c in args.cases.split(",") if c]
        unknown = sorted(set(cases) - set(CASES))
        if unknown:
            parser.error(f"unknown cases {unknown}; valid: {', '.join(CASES)}")
        selected = [e for e in entries(args.explore, args.after) if e.case in cases
                    and (not args.labels or any(_label_matches(e.label, p) for p in args.labels.split(",")))]
        if not selected:
            parser.error(f"no entry of the cases {cases} matches --labels {args.labels!r}; --explore adds the candidates, "
                         "and a pattern ending in $ must match a label whole")
        if args.full_test:
            try:
                selected = [full_test(e) for e in selected]
            except ValueError as err:  # a case whose test images come from its training pool: say which, and the fix
                parser.error(str(err))
        t0 = time.perf_counter()
        table = collect(selected, list(range(args.seed_start, args.seed_start + args.seeds)), args.scale, args.runs, args.jobs,
                        run_missing=not args.collect_only)
    raw, table = table, with_guard(table)
    if not args.report:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
        print(f"{len(table)} rows (runs + guarded selections) in {time.perf_counter() - t0:.0f} s -> {args.csv}")
    print_tables(report(table), goals(table))
    if args.margins:
        print_tables(margins(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
