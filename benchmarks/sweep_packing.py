"""Wall time of one sweep under each executor, and what each engine adds per run, in one process.

1. Packing: a 12-run table (default: digits-rotation × {stl, equal} × 6 seeds at ``smoke``; use
   ``--scale small`` for a bigger one) with ``local``, ``processes`` (``--jobs``) and ``ray``
   (a local instance with ``--jobs`` CPUs); ratio = executor wall / local wall. Every table must
   give the same numbers (checked).
2. Engine overhead: the same smoke run repeated ``--overhead-runs`` times with one run at a time
   (``processes --jobs 1``, ``ray`` with ``num_cpus=1`` per task on a 1-CPU instance), minus the
   local time: seconds each engine adds per run (process start / Ray task dispatch and result
   transfer; Ray's own start-up reported separately).

    python benchmarks/sweep_packing.py                    # 2 jobs, smoke
    python benchmarks/sweep_packing.py --jobs 8 --scale small
    python benchmarks/sweep_packing.py --no-ray

On a GPU machine, ``--device cuda --runs-per-gpu 4`` packs several ConvNet4 runs per GPU, e.g.
``--setting cifar10-rotation --scale smoke --steps 300 --batch-size 256`` (the CIFAR fixture files
auxnb writes: CIFAR shapes, no dataset needed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from auxnb.experiments import sweep


def timed_sweep(executor: str, settings, methods, seeds, scale, jobs, device, runs_per_gpu=1, **kw):
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        table = sweep(settings, methods, seeds, scale=scale, out_dir=Path(tmp), progress=False, device=device,
                      executor=executor, jobs=jobs, runs_per_gpu=runs_per_gpu, **kw)
        return time.perf_counter() - t0, table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="digits-rotation")
    p.add_argument("--methods", default="stl,equal")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--scale", default="smoke")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs-per-gpu", type=int, default=1)
    p.add_argument("--overhead-runs", type=int, default=4)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="lower steps of each packed run (default: the scale's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of each packed run (default: the scale's)")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    seeds = list(range(args.seeds))
    use_ray = not args.no_ray
    if use_ray:
        try:
            import ray
        except ImportError:
            use_ray = False
            print('ray not installed (pip install "auxnb[ray]"): skipping the ray rows')

    print(f"== packing: {args.setting} × {methods} × {len(seeds)} seeds = {len(methods) * len(seeds)} runs, "
          f"scale={args.scale}, jobs={args.jobs}, device={args.device}")
    sizes = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    if sizes:
        print(f"   overrides: {sizes}")
    local_s, ref = timed_sweep("local", args.setting, methods, seeds, args.scale, None, args.device, **sizes)
    rows = [("local", 1, local_s)]
    proc_s, table = timed_sweep("processes", args.setting, methods, seeds, args.scale, args.jobs, args.device, args.runs_per_gpu,
                                **sizes)
    same = ref.drop(columns="seconds").equals(table.drop(columns="seconds"))
    rows.append(("processes", args.jobs, proc_s))
    ray_start = None
    if use_ray:
        t0 = time.perf_counter()
        ray.init(num_cpus=args.jobs, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        ray_s, table = timed_sweep("ray", args.setting, methods, seeds, args.scale, None, args.device, args.runs_per_gpu,
                                   **sizes)
        same = same and ref.drop(columns="seconds").equals(table.drop(columns="seconds"))
        rows.append(("ray", args.jobs, ray_s))
        ray.shutdown()
    for name, jobs, s in rows:
        print(f"{name:<10} jobs={jobs:<3} wall {s:8.1f} s   / local {s / local_s:5.2f}")
    print(f"same numbers as local: {same}" + (f"; ray.init took {ray_start:.1f} s (not in its row)" if ray_start else ""))

    n = args.overhead_runs
    print(f"== engine overhead: {n} smoke runs of stl, one at a time")
    over_seeds = list(range(100, 100 + n))
    local_s, _ = timed_sweep("local", args.setting, ["stl"], over_seeds, "smoke", None, args.device)
    proc_s, _ = timed_sweep("processes", args.setting, ["stl"], over_seeds, "smoke", 1, args.device)
    print(f"local      {local_s / n:6.2f} s/run")
    print(f"processes  {proc_s / n:6.2f} s/run   adds {(proc_s - local_s) / n:+.2f} s/run")
    if use_ray:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        ray_s, _ = timed_sweep("ray", args.setting, ["stl"], over_seeds, "smoke", None, args.device)
        ray.shutdown()
        print(f"ray        {ray_s / n:6.2f} s/run   adds {(ray_s - local_s) / n:+.2f} s/run (ray.init excluded)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
