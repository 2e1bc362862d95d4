"""Issue 22's exploration: what do JTDS and MAOAL learn on their own (no guard), configuration by configuration?

Each named configuration (`CONFIGS`) is trained alone (``fallback=None``) on a case (`CASES`) for each
seed, one thread on the CPU; every finished run is one JSON file under ``--runs`` (resumable) with the
test/val metric, the wall time and, for JTDS, the noise trace over training (mean weight of corrupted
and clean samples per lower batch, their ratio and AUC, the loss filter's slope). ``--csv`` collects the
finished runs of the selection, one row per run with the *last* evaluation's trace values.

    python benchmarks/methods_learn.py --case noise40 --configs stl,equal,jtds,jtds-sgd --seeds 0-2
    python benchmarks/methods_learn.py --case noise40-long --configs stl,jtds-sgd --seeds 0-2
    python benchmarks/methods_learn.py --report                       # the table of the saved CSV
    python benchmarks/methods_learn.py --series benchmarks/results/methods_learn_series.csv  # JTDS's traces

``--series`` writes the noise traces over training of every finished JTDS run under ``--runs`` (one
row per run and evaluation: corrupted/clean weight ratio, AUC, filter slope), the data of chapter 6's
figures; the per-run files themselves are not committed.

The record of what was found is ``benchmarks/results/methods_learn.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_RUNS = HERE / "results" / "methods_learn_runs"
DEFAULT_CSV = HERE / "results" / "methods_learn_explore.csv"

#: case -> (setting, overrides); all at the setting's `small` scale
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "noise40": ("fashion-rotation", {"label_noise": 0.4}),
    "noise40-long": ("fashion-rotation", {"label_noise": 0.4, "epochs": 10}),
    "l2-digits": ("digits-rotation", {"label_fraction": 0.1, "dev_size": 20, "epochs": 20}),
    "l2-fashion": ("fashion-rotation", {"label_fraction": 0.2}),
}
#: the harmful-loss cases (no_harm.py's): an L2 term of coefficient 1 on every parameter is the only auxiliary loss
L2_CASES = ("l2-digits", "l2-fashion")

#: K = 3 spelled out: the constructor's default until issue 22's cost round (now K = 2), which every run
#: recorded under these names used
_SGD = {"upper_optimizer": "sgd", "upper_lr": 1e-2, "upper_momentum": 0.9, "clip": 10.0, "leading_eta": False, "terms": 3}
#: the issue-8 recommendation's upper level (Adam 0.1, the series with its leading η), no warm-up
_ADAM = {"upper_optimizer": "adam", "upper_lr": 0.1, "leading_eta": True, "warmup": 0, "terms": 3}
_L2 = {"feature_norm": "l2"}
#: name -> (method, keyword arguments), spelled out in full so a name keeps its meaning when the
#: constructor's defaults change; every bi-level entry runs with fallback=None
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "stl": ("stl", {}),
    "equal": ("equal", {}),
    # JTDS: the pre-issue-22 recommendation (raw feature, Adam 0.1) and the normalised feature
    "jtds-raw": ("jtds", {**_ADAM, "feature_norm": "none"}),
    "jtds": ("jtds", {**_ADAM, **_L2}),
    "jtds-dw": ("jtds", {**_ADAM, **_L2, "downweight_only": True}),
    "jtds-warm": ("jtds", {**_ADAM, **_L2, "warmup": 40}),
    "jtds-dw-warm": ("jtds", {**_ADAM, **_L2, "downweight_only": True, "warmup": 40}),
    # the authors' bounded φ step: SGD 1e-2, momentum 0.9, joint clip at 10, no leading η
    "jtds-sgd": ("jtds", {**_L2, **_SGD, "warmup": 0}),
    "jtds-sgd-warm": ("jtds", {**_L2, **_SGD, "warmup": 40}),  # the issue-22 recommendation until the cost round (K = 3)
    "jtds-sgd-warm-K2": ("jtds", {**_L2, **_SGD, "warmup": 40, "terms": 2}),  # `JTDS()` since issue 22's cost round
    "jtds-sgd-dw": ("jtds", {**_L2, **_SGD, "warmup": 0, "downweight_only": True}),
    "jtds-sgd-dw-warm": ("jtds", {**_L2, **_SGD, "warmup": 40, "downweight_only": True}),
    "jtds-sgd-K5": ("jtds", {**_L2, **_SGD, "warmup": 40, "terms": 5}),
    "jtds-sgd-warm80": ("jtds", {**_L2, **_SGD, "warmup": 80}),
    "jtds-sgd-warm-raw": ("jtds", {**_SGD, "warmup": 40, "feature_norm": "none"}),
    # cheaper upper levels for the cost goal (≤ 2.5× Equal): T = 20 instead of the setting's 10, or K = 1
    "jtds-sgd-warm-T20": ("jtds", {**_L2, **_SGD, "warmup": 40, "lower_steps": 20}),
    "jtds-sgd-warm-K1": ("jtds", {**_L2, **_SGD, "warmup": 40, "terms": 1}),
    "jtds-adam01": ("jtds", {**_ADAM, **_L2, "upper_lr": 0.01}),
    "jtds-dw-adam01": ("jtds", {**_ADAM, **_L2, "downweight_only": True, "upper_lr": 0.01}),
    "jtds-dw-adam01-warm": ("jtds", {**_ADAM, **_L2, "downweight_only": True, "upper_lr": 0.01, "warmup": 40}),
    "jtds-adam01-warm": ("jtds", {**_ADAM, **_L2, "upper_lr": 0.01, "warmup": 40}),
    "jtds-dw-raw": ("jtds", {**_ADAM, "downweight_only": True, "feature_norm": "none"}),
    "jtds-paper": ("jtds-paper", {}),
    # MAOAL on the L2 cases (the L2 term is added by the case): the pre-issue-22 direction, each switch
    "maoal-before": ("maoal", {"scale_invariant": "none", "regulariser_init": None}),
    "maoal-tangent": ("maoal", {"scale_invariant": "tangent", "regulariser_init": None}),
    "maoal-off": ("maoal", {"scale_invariant": "none", "regulariser_init": 0.0}),
    "maoal": ("maoal", {"scale_invariant": "tangent", "regulariser_init": 0.0}),  # the issue-22 recommendation
}


def make_method(name: str, case: str, scale: str):
    from auxnb.experiments import get_setting
    from auxnb.methods import JTDS, get, l2_penalty

    setting = CASES[case][0]
    method, kwargs = CONFIGS[name]
    if case in L2_CASES and method != "stl":
        if method == "equal":
            from no_harm import _plus_l2

            return _plus_l2(1.0)
        kwargs = {**kwargs, "aux_tasks": [], "aux_losses": {"l2": l2_penalty(scale=1.0)}}
    if method in ("stl", "equal"):
        return get(method)
    if method == "jtds-paper":
        return JTDS.paper()
    defaults = dict(get_setting(setting).method_defaults.get(method, {}).get(scale, {}))
    # every configuration here ran with α_G learned (`JTDS(pin_primary=False)`, the default before 2026-12-07,
    # methods_learn.md §15): spelled out so that a name keeps the meaning of its recorded runs
    # and with the hypergradient clipped at 10 (`clip_mode="max"`, the default before methods_learn.md §16)
    # and the series started afresh at every upper step (`warm_start=0`, the default before methods_learn.md §21)
    before_pin = {"pin_primary": False, "clip": 10.0, "clip_mode": "max", "warm_start": 0.0} if method == "jtds" else {}
    return get(method, **{**defaults, "fallback": None, **before_pin, **kwargs})


def _series(trace: list[dict[str, Any]]) -> dict[str, list]:
    keys = ("step", "val", "batch_weight_corrupted", "batch_weight_clean", "batch_weight_ratio", "batch_weight_auc",
            "weight_auc", "upper/hypergrad_norm")
    out: dict[str, list] = {k: [] for k in keys}
    out["filter_a"] = []
    out["aux_task_weight"] = []  # σ1(α_aux)/σ1(α_primary): the relative weight of the first auxiliary task
    out["batch_ess"] = []
    for row in trace:
        for k in keys:
            v = row.get(k)
            out[k].append(None if v is None else float(v))
        a = row.get("filter_a")
        out["filter_a"].append(None if a is None else float(a[0]))
        tw = row.get("task_weight")
        out["aux_task_weight"].append(None if tw is None or len(tw) < 2 else float(tw[1] / tw[0]))
        ess = row.get("batch_ess")
        out["batch_ess"].append(None if ess is None else [float(e) for e in ess])
    return out


def run_one(case: str, name: str, seed: int, scale: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from auxnb.experiments import run

    setting, overrides = CASES[case]
    t0, c0 = time.perf_counter(), time.process_time()
    result = run(setting, make_method(name, case, scale), seed=seed, scale=scale, device="cpu", progress=False, **overrides)
    row: dict[str, Any] = {"case": case, "config": name, "seed": seed, "scale": scale, "test": result.test_metric,
                           "val": result.val_metric, "best_step": result.best_step, "steps": result.config["steps"],
                           "seconds": time.perf_counter() - t0,
                           # CPU time of this one-thread process: the cost measure that the shared machine's load disturbs least
                           "cpu_seconds": time.process_time() - c0}
    last = result.trace[-1] if result.trace else {}
    for k in ("batch_weight_corrupted", "batch_weight_clean", "batch_weight_ratio", "batch_weight_auc", "weight_auc",
              "weight_corrupted", "weight_clean"):
        if k in last:
            row[k] = float(last[k])
    if "filter_a" in last:
        row["filter_a"] = float(last["filter_a"][0])
    if "task_weight" in last and len(last["task_weight"]) > 1:
        row["aux_task_weight"] = float(last["task_weight"][1] / last["task_weight"][0])
    for k, v in last.items():
        if k.startswith("importance/"):
            row[k] = float(v)
    row["series"] = _series(result.trace)
    return row


#: the trace columns `series_table` keeps (the per-run files hold a few more: the per-task ESS, the hypergradient norm)
SERIES_COLUMNS = ("step", "batch_weight_corrupted", "batch_weight_clean", "batch_weight_ratio", "batch_weight_auc",
                  "weight_auc", "filter_a", "aux_task_weight")


def series_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The noise traces of the finished runs that have one (JTDS's), long format: one row per run and
    evaluation, with the run's case, configuration, seed and final test accuracy."""
    out = []
    for r in rows:
        series = r.get("series") or {}
        ratio = series.get("batch_weight_ratio") or []
        if not any(v is not None for v in ratio):
            continue
        n = len(series["step"])
        columns = {k: series.get(k) or [None] * n for k in SERIES_COLUMNS}
        for i in range(n):
            out.append({"case": r["case"], "config": r["config"], "seed": r["seed"], "scale": r["scale"],
                        "test": r["test"], **{k: v[i] for k, v in columns.items()}})
    frame = pd.DataFrame(out)
    return frame.sort_values(["case", "config", "seed", "step"], kind="stable").reset_index(drop=True) if len(frame) else frame


#: this script's case -> the same case in `benchmarks/no_harm.py` (same setting and overrides)
NO_HARM_CASES = {"noise40": "f-noise-40%", "noise40-long": "f-noise-40%-long", "l2-digits": "l2-digits",
                 "l2-fashion": "l2-fashion"}
#: the configurations that are what `no_harm.py`'s entries train today: STL, Equal, and each family's
#: constructor defaults (`JTDS()` = `jtds-sgd-warm-K2` since issue 22's cost round, `jtds-sgd-warm` before;
#: `MAOAL()` = `maoal`)
NO_HARM_LABELS = {"stl": ("STL", "baseline", "baseline"), "equal": ("Equal", "baseline", "baseline"),
                  "jtds-sgd-warm-K2": ("JTDS recommended", "jtds", "recommended"),
                  "maoal": ("MAOAL recommended", "maoal", "recommended")}


def as_no_harm(frame: pd.DataFrame) -> pd.DataFrame:
    """This script's finished runs (a ``--csv`` table) in `no_harm.py`'s run-table format, so that
    `no_harm.with_guard`, `no_harm.goals` and `low_data.report` read them with `no_harm.py`'s own runs:
    only the configurations that are `no_harm.py` entries (`NO_HARM_LABELS`), on its cases
    (`NO_HARM_CASES`); the method's runs become ``"<X> recommended"`` (trained alone, as there).

        >>> row = {"case": "noise40", "config": "jtds-sgd-warm-K2", "seed": 3, "scale": "small", "test": 0.7, "val": 0.69}
        >>> as_no_harm(pd.DataFrame([row]))[["case", "label", "role", "seed"]].values.tolist()
        [['f-noise-40%', 'JTDS recommended', 'recommended', 3]]
    """
    keep = frame[frame["case"].isin(list(NO_HARM_CASES)) & frame["config"].isin(list(NO_HARM_LABELS))].copy()
    labels = keep["config"].map(NO_HARM_LABELS)
    out = pd.DataFrame({
        "case": keep["case"].map(NO_HARM_CASES), "label": labels.str[0], "family": labels.str[1], "role": labels.str[2],
        "opt": "adam", "method": keep["config"].map(lambda c: CONFIGS[c][0]), "kwargs": "{}", "overrides": "{}",
        "seed": keep["seed"], "scale": keep["scale"], "val": keep["val"], "test": keep["test"],
        "seconds": keep["seconds"] if "seconds" in keep else float("nan"),
    })
    for column in ("weight_corrupted", "weight_clean", "batch_weight_ratio", "batch_weight_auc"):
        if column in keep:
            out[column] = keep[column]
    return out.reset_index(drop=True)


def _path(runs: Path, case: str, name: str, seed: int, scale: str) -> Path:
    return runs / f"{case}__{name}__{scale}__s{seed}.json"


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",") if s]


def table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per (case, config): mean test (%), the paired mean Δ to STL and Equal over the seeds both ran, cost, noise stats."""
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "series"} for r in rows])
    out = []
    for (case, config), g in df.groupby(["case", "config"], sort=False):
        rec: dict[str, Any] = {"case": case, "config": config, "seeds": ",".join(str(s) for s in sorted(g["seed"])),
                               "test %": 100 * g["test"].mean(), "seconds": g["seconds"].mean()}
        if "cpu_seconds" in g:
            eq = df[(df["case"] == case) & (df["config"] == "equal")]
            if "cpu_seconds" in eq and eq["cpu_seconds"].notna().any():
                rec["cost ×Equal (CPU s)"] = g["cpu_seconds"].mean() / eq["cpu_seconds"].mean()
        for base in ("stl", "equal"):
            b = df[(df["case"] == case) & (df["config"] == base)].set_index("seed")["test"]
            paired = g.set_index("seed")["test"]
            common = paired.index.intersection(b.index)
            if len(common):
                rec[f"Δ {base}"] = 100 * float((paired[common] - b[common]).mean())
        for k in ("batch_weight_ratio", "batch_weight_auc", "weight_auc", "filter_a", "aux_task_weight"):
            if k in g:
                rec[k] = g[k].mean()
        out.append(rec)
    return pd.DataFrame(out).round(3)


#: the upper levels compared by ``--ess`` (keywords of `auxnb.methods.JTDS`)
ESS_CONFIGS: dict[str, dict[str, Any]] = {
    "raw, Adam 0.1 (issue-8 default)": {},
    "raw, Adam 0.01": {"upper_lr": 0.01},
    "raw, SGD bounded": {**_SGD},
    "l2, Adam 0.1": {**_L2},
    "l2, Adam 0.01": {**_L2, "upper_lr": 0.01},
    "l2, SGD bounded, warmup 40 (JTDS.bounded)": {**_L2, **_SGD, "warmup": 40},
    "l2, Adam 0.1, down-weight only": {**_L2, "downweight_only": True},
    "l2, Adam 0.01, down-weight only": {**_L2, "downweight_only": True, "upper_lr": 0.01},
}


def ess_table(seeds: list[int]) -> pd.DataFrame:
    """Per upper level: the primary weights' effective sample size (Σw)²/(BΣw²) on the first lower batch
    after the first φ update, on the 1568-d non-negative feature with ‖c‖₁ ≈ 1000 of tests/test_jtds.py."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_jtds import _wide_run  # the property test's run, so the table and the test measure one thing

    from auxnb.methods import JTDS

    rows = []
    for label, kwargs in ESS_CONFIGS.items():
        ess = [float(_wide_run(JTDS(fallback=None, **kwargs), seed)[0].trace[-1]["batch_ess"][0]) for seed in seeds]
        rows.append({"configuration": label, **{f"seed {s}": round(e, 3) for s, e in zip(seeds, ess)}})
    return pd.DataFrame(rows)


def synthetic_table(seeds: list[int]) -> pd.DataFrame:
    """JTDS's default and `JTDS.bounded()` (M = 10, every training sample a probe) on the synthetic
    label-noise problem of tests/test_jtds.py (`_noisy_run`: 4 classes, 40 % noise, MLP, SGD 0.1,
    30 epochs): test accuracy, corrupted/clean batch weight ratio, batch AUC and the filter slope."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_jtds import _noisy_run

    from auxnb.methods import JTDS

    makers = {"JTDS() default": lambda: JTDS(fallback=None, probe_size=None, lower_steps=10),
              "JTDS.bounded()": lambda: JTDS.bounded(fallback=None, probe_size=None, lower_steps=10)}
    rows = []
    for label, make in makers.items():
        for seed in seeds:
            result = _noisy_run(make(), seed)
            last = result.trace[-1]
            rows.append({"configuration": label, "seed": seed, "test": round(result.test_metric, 3),
                         "ratio": round(last["batch_weight_ratio"], 3), "auc": round(last["batch_weight_auc"], 3),
                         "filter_a": round(float(last["filter_a"][0]), 3)})
    return pd.DataFrame(rows)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Per (case, config): test % per seed, the mean, paired Δ to STL and Equal, the noise / α columns (markdown)."""
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "series"} for r in rows])
    summary = table(rows).set_index(["case", "config"])
    lines = ["| case | config | seeds | test % per seed | mean | Δ STL | Δ Equal | ratio | AUC | cost ×Equal (CPU) | α(L2) max |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (case, config), g in df.groupby(["case", "config"], sort=True):
        g = g.sort_values("seed")
        rec = summary.loc[(case, config)]

        def fmt(key: str, digits: int = 2) -> str:
            v = rec.get(key)
            return "" if v is None or pd.isna(v) else f"{v:+.{digits}f}" if key.startswith("Δ") else f"{v:.{digits}f}"

        alpha = [c for c in g.columns if c.startswith("importance/l2/")]
        amax = f"{g[alpha].max(axis=1).mean():.2f}" if alpha and g[alpha].notna().any().any() else ""
        lines.append(f"| {case} | {config} | {','.join(str(s) for s in g['seed'])} | "
                     f"{' / '.join(f'{100 * t:.1f}' for t in g['test'])} | {100 * g['test'].mean():.1f} | {fmt('Δ stl', 1)} | "
                     f"{fmt('Δ equal', 1)} | {fmt('batch_weight_ratio')} | {fmt('batch_weight_auc')} | "
                     f"{fmt('cost ×Equal (CPU s)', 1)} | {amax} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="noise40", help=f"one of {', '.join(CASES)}")
    parser.add_argument("--configs", default="stl,equal,jtds", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", default="0", help="e.g. 0-2 or 0,3,9")
    parser.add_argument("--scale", default="small")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--report", action="store_true", help="only print the table of every finished run under --runs")
    parser.add_argument("--ess", action="store_true", help="only print the effective-sample-size table (ESS_CONFIGS)")
    parser.add_argument("--synthetic", action="store_true", help="only print the synthetic label-noise table")
    parser.add_argument("--markdown", action="store_true", help="with --report: the per-seed markdown table instead")
    parser.add_argument("--series", type=Path, default=None,
                        help="only write the noise traces of every finished JTDS run under --runs to this CSV")
    args = parser.parse_args(argv)
    if args.series is not None:
        traces = series_table([json.loads(p.read_text()) for p in sorted(args.runs.glob("*.json"))])
        if not len(traces):
            print(f"no finished run with a noise trace under {args.runs}")
            return 1
        args.series.parent.mkdir(parents=True, exist_ok=True)
        traces.round(4).to_csv(args.series, index=False)
        print(f"{len(traces)} rows ({traces.groupby(['case', 'config', 'seed']).ngroups} runs) -> {args.series}")
        return 0
    if args.synthetic:
        print(synthetic_table(_seeds(args.seeds)).to_string(index=False))
        return 0
    if args.ess:
        print(ess_table(_seeds(args.seeds)).to_string(index=False))
        return 0
    if args.case not in CASES:
        parser.error(f"unknown case {args.case!r}; valid: {', '.join(CASES)}")
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; valid: {', '.join(CONFIGS)}")
    args.runs.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for seed in _seeds(args.seeds):
            for name in configs:
                path = _path(args.runs, args.case, name, seed, args.scale)
                if path.exists():
                    continue
                row = run_one(args.case, name, seed, args.scale)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(row, default=float))
                os.replace(tmp, path)
                extra = "".join(f" {k} {row[k]:.3f}" for k in ("batch_weight_ratio", "batch_weight_auc", "filter_a") if k in row)
                print(f"{args.case} {name:18s} seed {seed}: test {row['test']:.4f} ({row['seconds']:.0f} s){extra}", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(args.runs.glob("*.json"))]
    if not rows:
        print("no finished runs")
        return 0
    flat = pd.DataFrame([{k: v for k, v in r.items() if k != "series"} for r in rows])
    if not args.report:
        flat.to_csv(args.csv, index=False)
    if args.markdown:
        print(markdown(rows))
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
