"""How long a paper table will take, and whether it fits, before any run starts.

`plan` probes every (setting, method) of a table for a few lower steps on the current device,
with synthetic inputs of the paper's shapes: the setting is built on its fixture files (the
exact on-disk format, made by auxnb) at the paper's image size, backbone and batch size, the
training split repeated to fill the batches. No dataset is needed; a missing one is reported
on its row. Weights are random (``pretrained="none"``): the cost of a step does not depend on them.

A bi-level method is probed with an upper step after every lower step; its cost per lower step
is then ``lower + upper / T`` (T its ``lower_steps``; times the refit fraction when the method
refits), as in a real run. A method that trains several runs for one result (HPO-tune's trials,
the do-no-harm guard's STL and Equal fallbacks) is charged for all of them (column ``fits``).

Caveats (the table is an estimate, not a promise): fixture datasets have fewer classes than the
real ones (output heads are smaller); the first probe steps include allocator warm-up and, for
``hyper_lr="auto"``, one power iteration (a real run does one every ``auto_every`` upper steps), and
JTDS's warm-up is not probed (its first 40 lower steps take no upper step), so seconds per step err on
the high side; steps per run use the real datasets' published sizes; the
packed estimate assumes the slots run at the probed speed (true while the device is not saturated).
"""

from __future__ import annotations

import math
import os
import re
import resource
import time
from dataclasses import replace
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch

from ..methods import get as get_method
from ..selection import resolve_guard
from ..train import Trainer, resolve_device
from .core import SCALES, _TRAINER_KEYS, _SETTINGS, get_setting, resolve_config
from .protocols import SETTING_DATA, data_available

__all__ = ["plan", "table_runs", "PAPER_METHODS", "TRAIN_POOL"]

#: Paper method names (as in the published tables) -> auxnb registry names.
PAPER_METHODS = {
    "sll": "stl", "stl": "stl", "equal": "equal", "nal": "equal", "hpo-tune": "hpo-tune", "gcs": "gcs",
    "uncert": "uncert", "uncertainty": "uncert", "auxl": "auxl", "maoal": "maoal", "n-jtds": "n-jtds",
    "jtds": "jtds", "maxl": "maxl", "dtg-auxl": "dtg", "dtg": "dtg",
}

#: Training-pool size of each dataset (the official training split; ratings for recommendation)
#: used to count steps per epoch without the data: n_train ≈ pool − D_dev (− D_val when carved from it).
TRAIN_POOL = {
    "cifar10": 50_000, "cifar100": 50_000, "fashion-mnist": 60_000, "pet": 3_680, "cub": 5_994,
    "movielens-1m": 1_000_209, "movielens-100k": 100_000, "amazon-beauty": 198_502,
    "amazon-toys": 167_597, "amazon-movies": 1_697_533,
}
# the size-of-split knobs the probe takes from the smoke scale (the fixture pools are tiny)
_SIZE_KEYS = ("val_size", "test_size", "dev_size", "train_size", "shots", "aux_size")


def table_runs(table: str) -> tuple[list[str], list[str]]:
    """The settings (by their ``reproduces`` tags) and registry methods of a paper table.

    Raises:
        ValueError: no setting carries the tag (the message lists the tags that exist).
    """
    from .published import paper_results

    tag = f"[{table}]"
    found = [s.name for s in _SETTINGS.values() if re.search(rf"\[[^\]]*\b{re.escape(table)}\b[^\]]*\]", s.reproduces)]
    if not found:
        tags = sorted({t.strip() for s in _SETTINGS.values() for group in re.findall(r"\[([^\]]+)\]", s.reproduces) for t in group.split(",")})
        raise ValueError(f"No setting reproduces {tag}; table tags: {', '.join(tags)}.")
    try:
        names = list(paper_results(table)["method"])
    except ValueError:
        names = []
    methods = list(dict.fromkeys(PAPER_METHODS[n.lower()] for n in names if n.lower() in PAPER_METHODS))
    return found, methods or ["stl", "equal"]


def _n_train(setting: str, config: Mapping[str, Any]) -> int | None:
    datasets = SETTING_DATA.get(setting)
    if not datasets:
        # a bundled dataset (digits, the MNIST sample): it is here, so build its split and count
        try:
            bundle, _ = get_setting(setting).build({**config, "seed": 0, "data_root": None})
        except Exception:  # noqa: BLE001 - no count is an estimate left blank, never a failed plan
            return None
        return len(bundle.train)
    pool = TRAIN_POOL.get(datasets[0])
    if pool is None:
        return None
    n = int(config["train_size"]) if config.get("train_size") else pool
    for key in ("dev_size",):
        v = config.get(key)
        if isinstance(v, int):
            n -= v
    return max(n, 1)


def _steps_per_run(setting: str, config: Mapping[str, Any], n_train: int | None) -> int | None:
    if config.get("steps"):
        return int(config["steps"])
    if n_train is None or not config.get("epochs"):
        return None
    return int(config["epochs"]) * math.ceil(n_train / int(config.get("batch_size") or 64))


def _repeat(ds, n: int, g: torch.Generator):
    if ds is None or len(ds) >= n:
        return ds
    return ds.subset(torch.randint(len(ds), (n,), generator=g))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _probe(setting: str, method: str, scale: str, steps: int, device: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Time `steps` lower steps (each followed by an upper step for bi-level methods)."""
    spec = get_setting(setting)
    config = resolve_config(spec, scale, overrides)
    smoke = resolve_config(spec, "smoke")
    probe = {**config, **{k: smoke.get(k) for k in _SIZE_KEYS}, "seed": 0, "data_root": None, "download": False}
    if smoke.get("fixture"):
        probe.update(fixture=True, pretrained="none")
    torch.manual_seed(0)
    bundle, model = spec.build(probe)
    bs = int(config.get("batch_size") or 64)
    g = torch.Generator().manual_seed(0)
    bundle = replace(
        bundle, train=_repeat(bundle.train, 2 * bs, g), dev=_repeat(bundle.dev, bs, g),
        aux_train={k: _repeat(v, 2 * bs, g) for k, v in bundle.aux_train.items()},
    )
    kwargs = dict(spec.method_defaults.get(method, {}).get(scale, {}))
    m = get_method(method, **kwargs)
    every = int(m.lower_steps or 0)  # bi-level: T lower steps per upper step; 0: single-level
    refit = getattr(m, "refit", None)
    if every:
        m.lower_steps = 1
        if refit is not None:
            m.refit = None
        if getattr(m, "warmup", 0):
            # JTDS's warm-up (40 lower steps without φ updates) is longer than a probe: probe the upper
            # steps that follow it (the estimate then ignores the warm-up's savings: it errs high)
            m.warmup = 0
    dev = resolve_device(device)
    trainer_kw = {k: config[k] for k in _TRAINER_KEYS if k in config and k not in ("epochs", "steps", "eval_every")}
    trainer_kw["scheduler"] = None  # a schedule annealed over a few probe steps would reach lr 0 (same cost per step)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    # a selected run (HPO-tune's trials, the do-no-harm guard's STL and Equal, as `run`'s guard="auto"
    # gives) costs all of its candidates: time each candidate, not only the kept one
    result = Trainer(model, m, bundle, steps=steps, eval_every=steps, seed=0, device=dev, progress=False,
                     guard=resolve_guard("auto", m), **trainer_kw).fit()
    fits = [(r.config.get("method") == m.name and key == m.name, dict(r.timings))
            for key, r in (result.candidates or {m.name: result}).items()]
    wall = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    else:
        peak = max(_rss_mb() - rss0, 0.0)
    own = [t for is_own, t in fits if is_own]  # none for HPO-tune: only its trials train
    lower = sum(t["lower_s"] for t in own) / steps
    upper = sum(t["upper_s"] for t in own) / steps if every else 0.0
    per_step = lower + (upper / every * (refit if refit else 1.0) if every else 0.0)
    # the other runs of the outer loop (single-level: HPO-tune's fixed-weight trials, STL, Equal)
    per_step += sum((t["lower_s"] + t["upper_s"]) / steps for is_own, t in fits if not is_own)
    return {"s_per_step": per_step, "lower_s": lower, "upper_s": upper, "upper_every": every, "fits": len(fits),
            "peak_mb": peak, "probe_s": wall}


def _probe_job(setting, method, scale, steps, device, overrides):
    # in a child process: its own peak RSS; errors come back as a row, never abort the plan
    try:
        return _probe(setting, method, scale, steps, device, overrides)
    except Exception as err:  # noqa: BLE001 - the plan reports a failed probe per row
        return {"error": f"{type(err).__name__}: {err}"}


def plan(
    table: str | None = None,
    *,
    settings: str | Iterable[str] | None = None,
    methods: str | Iterable[str] | None = None,
    seeds: int | Sequence[int] = 3,
    scale: str = "paper",
    device: str | torch.device | None = None,
    probe_steps: int = 3,
    slots: int | None = None,
    runs_per_gpu: int = 1,
    data_root: str | os.PathLike | None = None,
    isolate: bool = True,
    **overrides: Any,
) -> pd.DataFrame:
    """Estimate a table's cost: one row per (setting, method), probed on the current device.

    Args:
        table: a paper table id (``"maoal-table1"``, ``"jtds-table2"``...; the settings whose
            ``reproduces`` names it, the methods of its published rows), or None with
            `settings` and `methods` given explicitly (these also narrow a table).
        seeds: number of seeds (or the list) per (setting, method).
        scale: the protocol whose steps, batch size and backbone are probed (default paper).
        probe_steps: lower steps timed per (setting, method).
        slots: concurrent runs for the packed estimate; default ``GPUs × runs_per_gpu`` on CUDA
            (fewer when peak memory does not fit), else the CPU cores.
        isolate: probe each pair in its own process (peak memory per probe on a CPU).

    Returns:
        Columns ``setting, method, runs, s_per_step, fits, steps_per_run, peak_mb, hours_sequential,
        hours_packed, data, note``. ``fits`` is how many trainings one run is: 1, or more when the
        method's outer loop trains several (HPO-tune's trials; the do-no-harm guard of MAOAL, JTDS and
        DTG trains STL and Equal after the method, 3 in all); ``s_per_step`` is all of them together,
        per step of the run; ``frame.attrs`` holds the totals (``hours_sequential``,
        ``hours_packed``, ``slots``, ``device``). ``peak_mb`` is CUDA's peak allocated memory on
        a GPU, the probe process's peak resident-memory growth on a CPU.
    """
    from .executors import ProcessExecutor, LocalExecutor

    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r}; use one of {', '.join(SCALES)}.")
    if probe_steps < 1:
        raise ValueError(f"probe_steps={probe_steps}: must be >= 1.")
    if table is not None:
        t_settings, t_methods = table_runs(table)
    elif settings is None or methods is None:
        raise ValueError("Give a paper table id (e.g. 'maoal-table1') or both settings and methods.")
    else:
        t_settings, t_methods = [], []
    sel_s = [settings] if isinstance(settings, str) else list(settings or t_settings)
    sel_m = [methods] if isinstance(methods, str) else list(methods or t_methods)
    for s in sel_s:
        get_setting(s)
    for m in sel_m:
        get_method(m)
    n_seeds = seeds if isinstance(seeds, int) else len(list(seeds))
    dev = resolve_device(device)
    pairs = [(s, m) for s in sel_s for m in sel_m]
    ex = ProcessExecutor(jobs=1, threads=torch.get_num_threads()) if isolate else LocalExecutor()
    dev_name = str(dev) if device is not None or dev.type == "cuda" else "cpu"
    probes = ex.map(_probe_job, [(s, m, scale, probe_steps, dev_name, dict(overrides)) for s, m in pairs])

    if slots is None:
        if dev.type == "cuda":
            gpus = torch.cuda.device_count()
            total = torch.cuda.get_device_properties(dev).total_memory / 2**20
            peaks = [p.get("peak_mb", 0) for p in probes if "error" not in p]
            fit = int(total * 0.9 // max(peaks)) if peaks and max(peaks) > 0 else runs_per_gpu
            slots = gpus * max(1, min(runs_per_gpu, fit))
        else:
            slots = os.cpu_count() or 1
    rows = []
    configs = {s: resolve_config(s, scale, overrides) for s in sel_s}
    # per setting, not per row: a bundled dataset's split is built to count it
    n_trains = {s: _n_train(s, configs[s]) for s in sel_s}
    for (s, m), p in zip(pairs, probes):
        config = configs[s]
        steps = _steps_per_run(s, config, n_trains[s])
        have = data_available(s, data_root)
        row = {"setting": s, "method": m, "runs": n_seeds, "batch": config.get("batch_size"),
               "backbone": config.get("backbone", ""), "s_per_step": p.get("s_per_step"), "fits": p.get("fits"),
               "steps_per_run": steps,
               "peak_mb": p.get("peak_mb"),
               "data": "ok" if have else f"missing ({', '.join(SETTING_DATA.get(s, ()))})", "note": p.get("error", "")}
        if row["s_per_step"] is not None and steps is not None:
            row["hours_sequential"] = row["s_per_step"] * steps * n_seeds / 3600
        else:
            row["hours_sequential"] = float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    total = float(out["hours_sequential"].sum(skipna=True))
    out["hours_packed"] = out["hours_sequential"] / slots
    out.attrs.update(hours_sequential=total, hours_packed=total / slots, slots=slots, device=str(dev), scale=scale,
                     probe_steps=probe_steps)
    return out
