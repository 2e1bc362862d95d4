"""auxnb's default CPU threads (1) against torch's default (one per core), in one run.

Times the README's main job, ``python -m auxnb run digits-rotation --method stl``, as a fresh
process each time: with no thread option (auxnb's default) and with ``--threads 0`` (torch's
default), alternating so both see the same load. ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
``AUXNB_THREADS`` are removed from the children's environment, so torch's default is what a
user without them gets. Prints each run, the medians and their ratio, the cores and the load.

    python benchmarks/threads.py                 # 2 runs of each
    python benchmarks/threads.py --repeats 3 --scale smoke
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(extra: list[str], scale: str | None, env: dict[str, str]) -> tuple[float, float, str]:
    cmd = [sys.executable, "-m", "auxnb", "run", "digits-rotation", "--method", "stl", "--no-progress", *extra]
    if scale:
        cmd += ["--scale", scale]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found = re.search(r"test_accuracy=([0-9.]+)", out.stdout)
    return wall, cpu, found.group(1) if found else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant (default 2)")
    parser.add_argument("--scale", default=None, help="smoke | small (default: the CLI's default, small without CUDA)")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "AUXNB_THREADS")}
    env.setdefault("AUXNB_DEVICE", "cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    variants = {"auxnb default (1 thread)": [], "torch default (--threads 0)": ["--threads", "0"]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    print(f"cores: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.1f}")
    for r in range(args.repeats):
        for name, extra in variants.items():
            wall, cpu, acc = one(extra, args.scale, env)
            times[name].append(wall)
            print(f"run {r + 1}  {name:<28} wall {wall:7.1f} s  cpu {cpu:7.1f} s  test accuracy {acc}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"median  {k:<28} {v:7.1f} s wall")
    a, b = med["torch default (--threads 0)"], med["auxnb default (1 thread)"]
    print(f"ratio torch default / auxnb default: {a / b:.2f}x wall (load average at end: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
