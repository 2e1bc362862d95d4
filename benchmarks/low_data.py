"""When does bi-level auxiliary learning help? MAOAL, JTDS and DTG against STL and Equal on digits.

Four low-data cases on scikit-learn's bundled digits (ConvNet4, the `small` protocol of the
digits settings: Adam 1e-3, batch 64, test accuracy at the best-val checkpoint):

* ``rotation-10%``: 10 % of the primary labels, rotation prediction as auxiliary task (MAOAL).
* ``mnist-10%``:    10 % of the primary labels, 5,000 real MNIST digits as auxiliary (MAOAL).
* ``noise-40%``:    every label, 40 % of the training labels corrupted, 50 clean D_dev images;
                    rotation auxiliary; each method under Adam and under SGD (JTDS).
* ``5-shot``:       5 labelled images per class, rotation auxiliary (DTG).

For each method: the paper-faithful version, each switch of issue 8 alone, and the recommended
combination (the library's default), all trained without the do-no-harm guard of issue 13
(``guard=None``); chapter 06 applies the guard to these runs afterwards. Every entry runs on the same seeds, so differences are
paired: the table shows mean ± std over seeds of the test accuracy, and of the paired
differences to STL and to Equal (same case, same lower optimiser), and how many seeds the entry
wins. For JTDS it also shows the mean final weight of corrupted and of clean training samples.

    python benchmarks/low_data.py                          # 5 seeds, every case, 2 processes
    python benchmarks/low_data.py --seeds 10 --jobs 16     # a bigger machine
    python benchmarks/low_data.py --cases noise-40% --only jtds --seeds 3
    python benchmarks/low_data.py --report                 # print the table of the saved CSV

Each finished run is appended to its own file under ``--runs`` (resumable: a re-run skips
them); the collected table is written to ``--csv`` (default benchmarks/results/low_data.csv,
the file the book chapter ``notebooks/06_when_auxiliary_learning_helps.ipynb`` reads).
"""

from __future__ import annotations

import dataclasses

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "results" / "low_data.csv"
DEFAULT_RUNS = HERE / "results" / "low_data_runs"

#: case -> (setting, overrides). Steps are fixed so every method sees the same number of lower steps.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "rotation-10%": ("digits-rotation", {"label_fraction": 0.1, "dev_size": 20, "epochs": 20}),
    "mnist-10%": ("digits-mnist", {"label_fraction": 0.1, "dev_size": 20, "epochs": 20}),
    "noise-40%": ("digits-rotation", {"label_noise": 0.4, "dev_size": 50, "rotation_mode": "random", "epochs": 20}),
    "5-shot": ("digits-rotation", {"shots": 5, "dev_size": 10, "rotation_mode": "random", "steps": 300, "eval_every": 15}),
}
#: The two lower optimisers of the label-noise case (same for every method of a row group).
OPTIMIZERS = {"adam": {"optimizer": "adam", "lr": 1e-3}, "sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}}


#: bumped when the Trainer changes what a method's run computes for the same entry and seed, so that
#: stored runs made before are not reused (STL's and Equal's runs, family "baseline", keep their keys):
#: 2 = the upper level draws from random streams of its own (methods_learn.md §18); 1 = before (no suffix)
METHOD_RUNS_VERSION = 2
#: methods whose runs changed again since: 3 = a method's set-up runs on a random state of its own
#: (DTG's and AuxL's built their generator modules from the lower level's stream and shifted every crop
#: after); 4 = DTG's and Auto-Mix's upper steps draw their pairings and partners from generators of their
#: own (they advanced the lower level's); methods_learn.md §19
#: 3 for JTDS: `JTDS()`'s series is warm-started (``warm_start=0.9``, methods_learn.md §21), so every entry built on
#: its defaults trains another run
RUNS_VERSION_BY_METHOD = {"dtg": 4, "auxl": 3, "auto-mix": 4, "auto-f-mix": 4, "jtds": 3}


@dataclass(frozen=True)
class Entry:
    """One row of the benchmark: a method with its switches, on one case and lower optimiser."""

    case: str
    label: str
    family: str  # "baseline", "maoal", "jtds", "dtg", "after" (issue 24's methods, ``--after``)
    role: str  # "baseline", "faithful", "switch", "recommended"
    method: str  # registry name, or "<name>.paper", "jtds.bounded", "jtds.issue8" (see `make_method`)
    kwargs: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    opt: str = "adam"

    @property
    def key(self) -> str:
        parts: list[Any] = [self.case, self.label, self.method, self.kwargs, self.overrides, self.opt]
        if self.family != "baseline":  # a stored run of an older trainer is not this code's run
            parts.append(f"runs-v{RUNS_VERSION_BY_METHOD.get(self.method.split('.')[0], METHOD_RUNS_VERSION)}")
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:10]


def _maoal_entries(case: str) -> list[Entry]:
    paper = "maoal.paper"  # MAOAL.paper("cub-semi"): T = 3, M = 3, η = lower lr, no clipping
    bn = {"freeze_aux_buffers": True}
    return [
        Entry(case, "STL", "baseline", "baseline", "stl"),
        Entry(case, "Equal", "baseline", "baseline", "equal"),
        Entry(case, "Equal + BN", "baseline", "baseline", "equal", overrides=bn),
        Entry(case, "MAOAL faithful", "maoal", "faithful", paper),
        Entry(case, "MAOAL + BN", "maoal", "switch", paper, overrides=bn),
        Entry(case, "MAOAL + refit", "maoal", "switch", paper, {"refit": 0.67}),
        Entry(case, "MAOAL + auto η", "maoal", "switch", paper, {"hyper_lr": "auto"}),
        Entry(case, "MAOAL + look-back 10", "maoal", "switch", paper, {"lookback": 10}),
        Entry(case, "MAOAL + upper on train", "maoal", "switch", paper, {"upper_data": "train"}),
        Entry(case, "MAOAL recommended", "maoal", "recommended", "maoal"),  # MAOAL(): upper on train, T = 3
    ]


def _jtds_entries(case: str, opt: str) -> list[Entry]:
    paper = "jtds.paper"  # M = 20, K = 3, η = lower lr, SGD 1e-2 on φ, no normalisation
    bn = {"freeze_aux_buffers": True}
    return [
        Entry(case, "STL", "baseline", "baseline", "stl", opt=opt),
        Entry(case, "Equal", "baseline", "baseline", "equal", opt=opt),
        Entry(case, "JTDS faithful", "jtds", "faithful", paper, opt=opt),
        Entry(case, "JTDS + batch-mean", "jtds", "switch", paper, {"normalize": "batch_mean"}, opt=opt),
        Entry(case, "JTDS + softmax", "jtds", "switch", paper, {"normalize": "softmax"}, opt=opt),
        Entry(case, "JTDS + auto η", "jtds", "switch", paper, {"hyper_lr": "auto"}, opt=opt),
        Entry(case, "JTDS + refit", "jtds", "switch", paper, {"refit": 0.67}, opt=opt),
        Entry(case, "JTDS + BN", "jtds", "switch", paper, overrides=bn, opt=opt),
        Entry(case, "JTDS + fast φ", "jtds", "switch", paper, {"lower_steps": 5, "upper_optimizer": "adam", "upper_lr": 0.05}, opt=opt),
        # JTDS(): batch-mean + auto η + fast φ + refit
        Entry(case, "JTDS recommended", "jtds", "recommended", "jtds", opt=opt),
    ]


def _dtg_entries(case: str) -> list[Entry]:
    paper = "dtg.paper"  # Neumann n = 3 with η = 1, upper objective on the primary training data
    bn = {"freeze_aux_buffers": True}
    return [
        Entry(case, "STL", "baseline", "baseline", "stl"),
        Entry(case, "Equal", "baseline", "baseline", "equal"),
        Entry(case, "DTG faithful", "dtg", "faithful", paper),
        Entry(case, "DTG + BN", "dtg", "switch", paper, overrides=bn),
        Entry(case, "DTG + auto η", "dtg", "switch", paper, {"hyper_lr": "auto"}),
        Entry(case, "DTG + dev & refit", "dtg", "switch", paper, {"upper_data": "dev", "refit": 0.67}),
        Entry(case, "DTG recommended", "dtg", "recommended", "dtg"),
    ]


def _candidates() -> list[Entry]:
    """Combinations tried while choosing the recommended one (``--explore``)."""
    bn = {"freeze_aux_buffers": True}
    out = []
    for case in ("rotation-10%", "mnist-10%"):
        p = "maoal.paper"
        out += [
            Entry(case, "MAOAL BN+refit+auto", "maoal", "candidate", p, {"refit": 0.67, "hyper_lr": "auto"}, bn),
            Entry(case, "MAOAL BN+refit", "maoal", "candidate", p, {"refit": 0.67}, bn),
            Entry(case, "MAOAL BN+train-upper", "maoal", "candidate", p, {"upper_data": "train"}, bn),
            Entry(case, "MAOAL BN+train-upper+auto", "maoal", "candidate", p, {"upper_data": "train", "hyper_lr": "auto"}, bn),
        ]
    for opt in OPTIMIZERS:
        p = "jtds.paper"
        out += [
            Entry("noise-40%", "JTDS BN+bm+refit", "jtds", "candidate", p, {"normalize": "batch_mean", "refit": 0.67}, bn, opt),
            Entry("noise-40%", "JTDS BN+sm+refit", "jtds", "candidate", p, {"normalize": "softmax", "refit": 0.67}, bn, opt),
            Entry("noise-40%", "JTDS BN+bm+refit+auto", "jtds", "candidate", p,
                  {"normalize": "batch_mean", "refit": 0.67, "hyper_lr": "auto"}, bn, opt),
        ]
    p = "dtg.paper"
    out += [
        Entry("5-shot", "DTG BN+auto", "dtg", "candidate", p, {"hyper_lr": "auto"}, bn),
        Entry("5-shot", "DTG BN+dev&refit", "dtg", "candidate", p, {"upper_data": "dev", "refit": 0.67}, bn),
    ]
    # second round, around the recommended defaults (after the first 5-seed table)
    out += [
        Entry("5-shot", "DTG() init weight 0.3", "dtg", "candidate", "dtg", {"init_weight": 0.3}),
        Entry("5-shot", "DTG() init weight 0.1", "dtg", "candidate", "dtg", {"init_weight": 0.1}),
        Entry("5-shot", "DTG() no instance reg", "dtg", "candidate", "dtg", {"instance_reg": 0.0}),
        Entry("5-shot", "DTG() T = 1", "dtg", "candidate", "dtg", {"lower_steps": 1}),
    ]
    # third round
    out += [
        Entry("5-shot", "DTG() init weight 0.03", "dtg", "candidate", "dtg", {"init_weight": 0.03}),
        Entry("5-shot", "DTG() init weight 0.01", "dtg", "candidate", "dtg", {"init_weight": 0.01}),
        Entry("5-shot", "DTG() φ Adam 0.003", "dtg", "candidate", "dtg", {"upper_lr": 0.003}),
        Entry("5-shot", "DTG() no instance reg (init 0.1)", "dtg", "candidate", "dtg", {"instance_reg": 0.0}),
    ]
    # issue 22: the given auxiliary task starts where Equal has it (w_i = 1), the generated samples nearly off
    out += [
        Entry("5-shot", "DTG aux weight 1", "dtg", "candidate", "dtg", {"aux_init_weight": 1.0}),
        Entry("5-shot", "DTG aux weight 0.3", "dtg", "candidate", "dtg", {"aux_init_weight": 0.3}),
        Entry("5-shot", "DTG weight lr 0.05", "dtg", "candidate", "dtg", {"weight_lr": 0.05}),
        Entry("5-shot", "DTG aux weight 0.3, weight lr 0.05", "dtg", "candidate", "dtg", {"aux_init_weight": 0.3, "weight_lr": 0.05}),
    ]
    # (these "JTDS()" candidates vary the constructor's defaults of their time, issue 8's: `JTDS.issue8()`)
    for opt in OPTIMIZERS:
        out += [
            Entry("noise-40%", "JTDS() φ Adam 0.1", "jtds", "candidate", "jtds.issue8", {"upper_lr": 0.1}, opt=opt),
            Entry("noise-40%", "JTDS() auto target 1.5", "jtds", "candidate", "jtds.issue8", {"auto_target": 1.5}, opt=opt),
            Entry("noise-40%", "JTDS() K = 5", "jtds", "candidate", "jtds.issue8", {"terms": 5}, opt=opt),
            Entry("noise-40%", "JTDS() no-aux", "jtds", "candidate", "jtds.issue8", {"variant": "no-aux"}, opt=opt),
            Entry("noise-40%", "JTDS() softmax", "jtds", "candidate", "jtds.issue8", {"normalize": "softmax"}, opt=opt),
        ]
    for opt in OPTIMIZERS:
        out += [
            Entry("noise-40%", "JTDS() φ Adam 0.01", "jtds", "candidate", "jtds.issue8", {"upper_lr": 0.01}, opt=opt),
            Entry("noise-40%", "JTDS() T = 20", "jtds", "candidate", "jtds.issue8", {"lower_steps": 20}, opt=opt),
            Entry("noise-40%", "JTDS() no refit", "jtds", "candidate", "jtds.issue8", {"refit": None}, opt=opt),
        ]
    # issue 22's cost round: JTDS() and DTG() take K = 2 Neumann terms since; the defaults before it (K = 3)
    out += [Entry("noise-40%", "JTDS K=3 (before)", "jtds", "candidate", "jtds", {"terms": 3}, opt=opt) for opt in OPTIMIZERS]
    out.append(Entry("5-shot", "DTG K=3 (before)", "dtg", "candidate", "dtg", {"terms": 3}))
    # issue 22 (methods_learn.md §13, both rejected): one Neumann term for DTG, and for JTDS the T = 19 that a
    # cadence aiming at ~14 upper steps after the warm-up gives these 300-step runs (the default: T = 5)
    out.append(Entry("5-shot", "DTG K=1", "dtg", "candidate", "dtg", {"terms": 1}))
    out += [Entry("noise-40%", "JTDS T=19", "jtds", "candidate", "jtds", {"lower_steps": 19}, opt=opt) for opt in OPTIMIZERS]
    # methods_learn.md §14-§15: the stored `JTDS recommended` runs took uᵀ∂g/∂φ by a double backward (the default
    # now: forward mode, the same maths); and λ_max re-estimated every 40 upper slots instead of 10 (2 estimates
    # in these 60-slot runs instead of 6)
    out += [Entry("noise-40%", "JTDS forward mode", "jtds", "candidate", "jtds", {"forward_mode": True}, opt=opt)
            for opt in OPTIMIZERS]
    out += [Entry("noise-40%", "JTDS λ every 40", "jtds", "candidate", "jtds", {"auto_every": 40}, opt=opt)
            for opt in OPTIMIZERS]
    # methods_learn.md §15: the warm-up (no φ step in the first 40 lower steps) is 2 epochs of these 1,200 training
    # images but ~1.3 of Fashion-MNIST's 2,000; under SGD the best D_val step comes at ~80, before the filter acts
    out += [Entry("noise-40%", "JTDS warm-up 20", "jtds", "candidate", "jtds", {"warmup": 20}, opt=opt)
            for opt in OPTIMIZERS]
    # ... and without the auxiliary task (a data schedule on the primary task alone): Equal is below STL under both
    # optimisers here, so how much of JTDS's gain or loss is the rotation task's?
    out += [Entry("noise-40%", "JTDS no-aux", "jtds", "candidate", "jtds", {"variant": "no-aux"}, opt=opt)
            for opt in OPTIMIZERS]
    # ... and φ's bounded step three times as long (SGD 3e-2 with the joint clip at 10: ≤ 0.3 per upper step): under
    # SGD the best D_val step comes at ~75 lower steps, seven upper steps after the warm-up
    out += [Entry("noise-40%", f"JTDS upper lr {lr}", "jtds", "candidate", "jtds", {"upper_lr": lr}, opt=opt)
            for lr in (0.03, 0.02) for opt in OPTIMIZERS]
    # ... and α_G (the primary's α) not learned, so that the auxiliary weights σ1(α_k)/σ1(α_G) cannot run away
    out += [Entry("noise-40%", "JTDS pinned primary", "jtds", "candidate", "jtds", {"pin_primary": True}, opt=opt)
            for opt in OPTIMIZERS]
    # methods_learn.md §16: the faster φ again, now that α_G is pinned (the default since §15)
    out += [Entry("noise-40%", f"JTDS pinned, upper lr {lr}", "jtds", "candidate", "jtds", {"upper_lr": lr}, opt=opt)
            for lr in (0.03, 0.02) for opt in OPTIMIZERS]
    # ... and φ's step of one length (the hypergradient scaled to norm 5 at every upper step, lr 0.01): its norm
    # here is 0.2-1.2 under SGD and 9 falling to 0.5-3.5 under Adam, ~5 on Fashion-MNIST
    out += [Entry("noise-40%", "JTDS fixed step 0.05", "jtds", "candidate", "jtds", {"clip_mode": "fixed", "clip": 5.0},
                  opt=opt) for opt in OPTIMIZERS]
    # ... and D_dev given back to θ for the last third (`refit`, on top of the default since §16)
    out += [Entry("noise-40%", "JTDS refit 0.67", "jtds", "candidate", "jtds", {"refit": 0.67}, opt=opt)
            for opt in OPTIMIZERS]
    # methods_learn.md §20: θ trains on D_train ∪ D_dev from the first step (STL's training set and batches), φ
    # still learned from D_dev
    out += [Entry("noise-40%", "JTDS dev in train", "jtds", "candidate", "jtds", {"dev_in_train": True}, opt=opt)
            for opt in OPTIMIZERS]
    # §21: the Neumann series warm-started from 0.9 × the previous upper step's u (a longer horizon, same cost)
    out += [Entry("noise-40%", "JTDS warm series 0.9", "jtds", "candidate", "jtds", {"warm_start": 0.9}, opt=opt)
            for opt in OPTIMIZERS]
    # ... and the series started afresh at every upper step: `JTDS()` until §21
    out += [Entry("noise-40%", "JTDS cold series", "jtds", "candidate", "jtds", {"warm_start": 0.0}, opt=opt)
            for opt in OPTIMIZERS]
    # §22: the warm series advanced through the warm-up's upper slots too (φ's first update with its horizon)
    out += [Entry("noise-40%", "JTDS series through warm-up", "jtds", "candidate", "jtds", {"warmup_series": True},
                  opt=opt) for opt in OPTIMIZERS]
    return out


def _after_entries(case: str, opt: str = "adam") -> list[Entry]:
    """The methods of issue 24 ("after the three papers"), each with its constructor's defaults, trained alone
    (``--after``; the aggregator needs ``pip install "auxnb[aggregators]"``)."""
    return [
        Entry(case, "ForkMerge", "after", "after", "forkmerge", opt=opt),
        Entry(case, "AuxiNash", "after", "after", "auxinash", opt=opt),
        Entry(case, "Auto-Lambda", "after", "after", "auto-lambda", opt=opt),
        Entry(case, "UPGrad (aggregator)", "after", "after", "aggregator", {"aggregator": "upgrad"}, opt=opt),
    ]


def _after_candidates(case: str, opt: str = "adam") -> list[Entry]:
    """``--after --explore``: AuxiNash and Auto-Lambda with the upper objective on fresh training batches
    (``upper_data="train"``: no labels held out as D_dev; the Auto-Lambda authors' code does this), and
    ForkMerge merging every eighth and every half of the run (the default: every quarter)."""
    return [
        Entry(case, "AuxiNash, upper on train", "after", "after-switch", "auxinash", {"upper_data": "train"}, opt=opt),
        Entry(case, "Auto-Lambda, upper on train", "after", "after-switch", "auto-lambda", {"upper_data": "train"}, opt=opt),
        # ForkMerge's Δt: the default merges every quarter of the run; these every eighth and every half
        Entry(case, "ForkMerge, Δt = 1/8 run", "after", "after-switch", "forkmerge", {"interval": 0.125}, opt=opt),
        Entry(case, "ForkMerge, Δt = 1/2 run", "after", "after-switch", "forkmerge", {"interval": 0.5}, opt=opt),
    ]


def _issue22_candidates() -> list[Entry]:
    """``--explore``: issue 22's candidate for JTDS (`JTDS.bounded()`: the l2-normalised score, the
    bounded SGD step on φ, a 40-step warm-up), beside the constructor's default."""
    return [Entry("noise-40%", "JTDS.bounded()", "jtds", "candidate", "jtds.bounded", opt=opt) for opt in OPTIMIZERS]


def entries(explore: bool = False, after: bool = False) -> list[Entry]:
    out = _maoal_entries("rotation-10%") + _maoal_entries("mnist-10%")
    for opt in OPTIMIZERS:
        out += _jtds_entries("noise-40%", opt)
    out += _dtg_entries("5-shot")
    if explore:
        out += _candidates() + _issue22_candidates()
    if after:
        for case in CASES:
            for opt in (OPTIMIZERS if case == "noise-40%" else ("adam",)):
                out += _after_entries(case, opt) + (_after_candidates(case, opt) if explore else [])
    return out


#: JTDS candidates recorded while JTDS() learned the primary's α_G (`pin_primary=False`, the default before 2026-12-07;
#: methods_learn.md §15): `make_method` spells it out, so that a label keeps the meaning of its recorded runs
LEARNED_G = frozenset({"JTDS.bounded()", "JTDS K=3 (before)", "JTDS T=19", "JTDS forward mode", "JTDS λ every 40",
                       "JTDS warm-up 20", "JTDS no-aux", "JTDS upper lr 0.03", "JTDS upper lr 0.02"})
#: JTDS candidates recorded while JTDS() clipped the hypergradient at norm 10 (`clip_mode="max"`, the default before
#: methods_learn.md §16; since then it is scaled to norm 5): `make_method` spells that out too
CLIP10 = LEARNED_G | frozenset({"JTDS pinned primary", "JTDS pinned, upper lr 0.03", "JTDS pinned, upper lr 0.02"})
#: JTDS entries of the warm-started series' era (methods_learn.md §21: `JTDS()` has ``warm_start=0.9``); every other
#: JTDS entry was recorded with the series started afresh and `make_method` spells ``warm_start=0`` out for it
WARM_SERIES = frozenset({"JTDS recommended", "JTDS warm series 0.9", "JTDS warm series 0.5", "JTDS cold series",
                         "JTDS series through warm-up"})


def make_method(entry: Entry):
    from auxnb.methods import DTG, JTDS, MAOAL, get

    if entry.label in LEARNED_G:
        entry = dataclasses.replace(entry, kwargs={"pin_primary": False, **entry.kwargs})
    if entry.label in CLIP10:
        entry = dataclasses.replace(entry, kwargs={"clip": 10.0, "clip_mode": "max", **entry.kwargs})
    if entry.method.startswith("jtds") and entry.label not in WARM_SERIES:
        entry = dataclasses.replace(entry, kwargs={"warm_start": 0.0, **entry.kwargs})

    if entry.method == "maoal.paper":
        return MAOAL.paper("cub-semi", **entry.kwargs)
    if entry.method == "jtds.paper":
        return JTDS.paper(**entry.kwargs)
    if entry.method == "dtg.paper":
        return DTG.paper(**entry.kwargs)
    if entry.method == "jtds.bounded":  # = JTDS() since issue 22
        return JTDS.bounded(**entry.kwargs)
    if entry.method == "jtds.issue8":  # the constructor's defaults before issue 22
        return JTDS.issue8(**entry.kwargs)
    # every run here is the method alone (`run_one` passes guard=None); chapter 6 applies the
    # do-no-harm guard to these runs afterwards (select_by_val)
    return get(entry.method, **entry.kwargs)


def run_one(entry: Entry, seed: int, scale: str) -> dict[str, Any]:
    """Train one entry on one seed (in a worker process: one thread, CPU)."""
    import torch

    torch.set_num_threads(1)
    from auxnb.experiments import run

    setting, overrides = CASES[entry.case]
    overrides = {**overrides, **(OPTIMIZERS[entry.opt] if entry.case == "noise-40%" else {}), **entry.overrides}
    t0 = time.perf_counter()
    result = run(setting, make_method(entry), seed=seed, scale=scale, device="cpu", progress=False, guard=None,
                 **overrides)
    row: dict[str, Any] = {
        "case": entry.case, "label": entry.label, "family": entry.family, "role": entry.role, "opt": entry.opt,
        "method": entry.method, "kwargs": json.dumps(entry.kwargs, sort_keys=True),
        "overrides": json.dumps(entry.overrides, sort_keys=True), "seed": seed, "scale": scale,
        "val": result.val_metric, "test": result.test_metric, "best_step": result.best_step,
        "steps": result.config["steps"], "refit_step": result.config.get("refit_step"),
        "seconds": time.perf_counter() - t0,
    }
    last = result.trace[-1] if result.trace else {}
    for key in ("weight_corrupted", "weight_clean"):
        if key in last:
            row[key] = last[key]
    for key, value in last.items():  # MAOAL: the final importance of every (aux loss, module)
        if key.startswith("importance/"):
            row[key] = value
        if key.startswith("weight/"):  # DTG's task weights w_i, w_g: at the end, and their largest value in the run
            row[key] = float(value)
            row[f"max {key}"] = max(float(r[key]) for r in result.trace if key in r)
    if "upper/hyper_lr" in last:
        row["hyper_lr_last"] = last["upper/hyper_lr"]
    return row


def _run_path(runs: Path, entry: Entry, seed: int, scale: str) -> Path:
    return runs / f"{entry.key}__seed{seed}__{scale}.json"


def collect(selected: list[Entry], seeds: list[int], scale: str, runs: Path, jobs: int, progress: bool,
            executor: str = "processes", run_missing: bool = True) -> pd.DataFrame:
    """Run what is missing (unless `run_missing` is False), then read every finished run of `selected` × `seeds`."""
    runs.mkdir(parents=True, exist_ok=True)
    # seed by seed (every entry of seed 0, then seed 1, ...): an interrupted run leaves paired evidence
    todo = [(e, s) for s in seeds for e in selected if run_missing and not _run_path(runs, e, s, scale).exists()]
    if todo:
        from tqdm.auto import tqdm

        from auxnb.experiments.executors import get_executor

        bar = tqdm(total=len(todo), disable=not progress, desc="low_data runs")

        def finished(i: int, row: dict[str, Any]) -> None:
            e, s = todo[i]
            path = _run_path(runs, e, s, scale)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row, default=float))
            os.replace(tmp, path)
            bar.update(1)

        # within a seed the slowest entries first so the pool drains evenly; one process (one thread) per run
        ex = get_executor(executor, jobs=max(1, jobs), **({"threads": 1} if executor == "processes" else {}))
        ex.map(run_one, [(e, s, scale) for e, s in todo], on_result=finished)
        bar.close()
    rows = [json.loads(p.read_text()) for e in selected for s in seeds if (p := _run_path(runs, e, s, scale)).exists()]
    return pd.DataFrame(rows)


def _fmt(values: pd.Series, scale: float = 100.0, signed: bool = False) -> str:
    values = values.dropna().astype(float) * scale
    if values.empty:
        return ""
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():+.2f} ± {std:.2f}" if signed else f"{values.mean():.2f} ± {std:.2f}"


def report(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (case, optimiser, entry): test accuracy and paired differences to STL and Equal (percent points)."""
    out = []
    for (case, opt), group in table.groupby(["case", "opt"], sort=False):
        wide = group.pivot_table(index="seed", columns="label", values="test", aggfunc="first")
        for label in dict.fromkeys(group["label"]):
            rows = group[group["label"] == label]
            row: dict[str, Any] = {"case": case, "opt": opt, "entry": label, "role": rows["role"].iloc[0], "n": len(rows),
                                   "test %": _fmt(rows["test"])}
            for base in ("STL", "Equal"):
                if base in wide and label != base:
                    diff = (wide[label] - wide[base]).dropna()
                    row[f"Δ vs {base}"] = _fmt(diff, signed=True)
                    row[f"wins vs {base}"] = f"{int((diff > 0).sum())}/{len(diff)}"
                else:
                    row[f"Δ vs {base}"], row[f"wins vs {base}"] = "", ""
            if "weight_corrupted" in rows and rows["weight_corrupted"].notna().any():
                row["w corrupted / clean"] = f"{rows['weight_corrupted'].mean():.3f} / {rows['weight_clean'].mean():.3f}"
                row["seeds corrupted < clean"] = f"{int((rows['weight_corrupted'] < rows['weight_clean']).sum())}/{len(rows)}"
            out.append(row)
    return pd.DataFrame(out).fillna("")


def goals(table: pd.DataFrame) -> pd.DataFrame:
    """The issue's goals, checked on the same run (True / False with the numbers)."""
    mean = table.groupby(["case", "opt", "label"])["test"].mean() * 100
    checks = []

    def get(case, label, opt="adam"):
        return mean.get((case, opt, label), math.nan)

    for case in ("rotation-10%", "mnist-10%"):
        rec, best = get(case, "MAOAL recommended"), max(get(case, "STL"), get(case, "Equal"))
        checks.append({"goal": f"MAOAL recommended within 1 pt of max(STL, Equal) on {case}", "value": f"{rec:.2f} vs {best:.2f}",
                       "met": bool(rec >= best - 1.0)})
    above = [get(c, "MAOAL recommended") > max(get(c, "STL"), get(c, "Equal")) for c in ("rotation-10%", "mnist-10%")]
    checks.append({"goal": "MAOAL recommended above both STL and Equal in at least one case", "value": str([bool(a) for a in above]), "met": bool(any(above))})
    for opt in OPTIMIZERS:
        rows = table[(table["case"] == "noise-40%") & (table["opt"] == opt) & (table["label"] == "JTDS recommended")]
        rec, stl = get("noise-40%", "JTDS recommended", opt), get("noise-40%", "STL", opt)
        checks.append({"goal": f"JTDS recommended ≥ STL + 2 at 40% noise ({opt})", "value": f"{rec:.2f} vs {stl:.2f}",
                       "met": bool(round(rec - stl, 2) >= 2.0)})  # to the table's precision (0.01 points), not float noise
        if "weight_corrupted" in rows and len(rows):
            wc, wk = rows["weight_corrupted"].mean(), rows["weight_clean"].mean()
            checks.append({"goal": f"JTDS recommended: corrupted weight < clean ({opt})", "value": f"{wc:.3f} vs {wk:.3f}",
                           "met": bool(wc < wk)})
    rec, stl = get("5-shot", "DTG recommended"), get("5-shot", "STL")
    checks.append({"goal": "DTG recommended ≥ STL at 5 shots", "value": f"{rec:.2f} vs {stl:.2f}", "met": bool(rec >= stl)})
    return pd.DataFrame(checks)


def print_tables(*tables: pd.DataFrame) -> None:
    """Print result tables in full width, one blank line apart (the scripts' report)."""
    with pd.option_context("display.max_rows", 200, "display.max_columns", 20, "display.width", 250):
        print("\n\n".join(t.to_string(index=False) for t in tables))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (default 0; the confirmation run uses 5)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--only", default="", help="comma-separated families to keep besides the baselines (maoal,jtds,dtg,after)")
    parser.add_argument("--after", action="store_true",
                        help="also run issue 24's methods (ForkMerge, AuxiNash, Auto-Lambda, UPGrad; the last needs auxnb[aggregators])")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (one thread each)")
    parser.add_argument("--executor", choices=("local", "processes", "ray"), default="processes",
                        help="where the runs execute (auxnb.experiments.executors; ray: $RAY_ADDRESS or a local instance)")
    parser.add_argument("--scale", default="small", help="scale of the digits settings (default small)")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="directory of per-run results (resumable)")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="where the collected table is written")
    parser.add_argument("--report", action="store_true", help="only print the table of --csv")
    parser.add_argument("--explore", action="store_true", help="also run the candidate combinations")
    parser.add_argument("--labels", default="", help="keep only entries whose label starts with one of these (comma-separated)")
    parser.add_argument("--roles", default="", help="comma-separated roles to keep (baseline,faithful,switch,recommended,candidate,after)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--collect-only", action="store_true", help="run nothing: collect the finished runs into --csv")
    args = parser.parse_args(argv)

    if args.report:
        table = pd.read_csv(args.csv)
    else:
        cases = [c for c in args.cases.split(",") if c]
        unknown = sorted(set(cases) - set(CASES))
        if unknown:
            parser.error(f"unknown cases {unknown}; valid: {', '.join(CASES)}")
        families = {"baseline", *[f for f in args.only.split(",") if f]} if args.only else None
        roles = set(args.roles.split(",")) if args.roles else None
        selected = [
            e for e in entries(args.explore, args.after)
            if e.case in cases and (families is None or e.family in families) and (roles is None or e.role in roles)
            and (not args.labels or any(e.label.startswith(p) for p in args.labels.split(",")))
        ]
        selected.sort(key=lambda e: e.family == "baseline")  # bi-level (slow) entries first: the pool drains evenly
        t0 = time.perf_counter()
        table = collect(selected, list(range(args.seed_start, args.seed_start + args.seeds)), args.scale, args.runs, args.jobs,
                        not args.no_progress, args.executor, run_missing=not args.collect_only)
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
        print(f"{len(table)} runs collected in {time.perf_counter() - t0:.0f} s -> {args.csv}")
    print_tables(report(table), goals(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
