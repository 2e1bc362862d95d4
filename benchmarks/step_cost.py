"""Cost of each method relative to STL, measured in one process on the digits-rotation setting.

For every method: time per lower step (lower_s / steps) and the whole run's time per step
(lower + upper steps), both as medians over repeats and as ratios to STL measured in the same
run (machines are noisy; ratios are what to compare). Methods are interleaved across repeats.

    python benchmarks/step_cost.py                 # all registered benchmark entries
    python benchmarks/step_cost.py --methods stl,gcs --repeats 5 --steps 60
"""

from __future__ import annotations

import argparse
import statistics

import torch

from auxnb import experiments
from auxnb.experiments.core import get_setting, resolve_config
from auxnb.methods import get
from auxnb.train import Trainer

#: name -> (registry name, kwargs). Later issues add their methods here.
ENTRIES: dict[str, tuple[str, dict]] = {
    "stl": ("stl", {}),
    "equal": ("equal", {}),
    "fixed": ("fixed", {"weights": {"rotation": 0.5}}),
    "uncert": ("uncert", {}),
    "gcs": ("gcs", {}),
    # --- MAOAL / AuxL (issue 4) ---
    # --- JTDS / N-JTDS (issue 5) ---
    # --- DTG / MixUp / MAXL (issue 6) ---
}


def measure(entry: str, setting: str, steps: int, batch_size: int, seed: int) -> tuple[float, float]:
    method_name, kwargs = ENTRIES[entry]
    config = resolve_config(setting, "small", {"batch_size": batch_size})
    bundle, model = get_setting(setting).build({**config, "seed": seed, "data_root": None})
    trainer = Trainer(model, get(method_name, **kwargs), bundle, steps=steps, eval_every=steps,
                      batch_size=batch_size, seed=seed, device="cpu", progress=False)
    result = trainer.fit()
    t = result.timings
    return t["lower_s"] / steps, (t["lower_s"] + t["upper_s"]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(ENTRIES))
    parser.add_argument("--setting", default="digits-rotation")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in ENTRIES]
    if unknown:
        raise SystemExit(f"unknown entries {unknown}; known: {', '.join(ENTRIES)}")
    if "stl" not in names:
        names.insert(0, "stl")
    lower: dict[str, list[float]] = {m: [] for m in names}
    whole: dict[str, list[float]] = {m: [] for m in names}
    measure("stl", args.setting, 5, args.batch_size, 0)  # warm-up
    for r in range(args.repeats):
        for m in names:
            lo, wh = measure(m, args.setting, args.steps, args.batch_size, r)
            lower[m].append(lo)
            whole[m].append(wh)
    base_lo, base_wh = statistics.median(lower["stl"]), statistics.median(whole["stl"])
    print(f"setting={args.setting} steps={args.steps} batch={args.batch_size} repeats={args.repeats} threads={args.threads}")
    print(f"{'method':<12} {'lower ms':>9} {'x STL':>7} {'whole ms':>9} {'x STL':>7}")
    for m in names:
        lo, wh = statistics.median(lower[m]), statistics.median(whole[m])
        print(f"{m:<12} {lo * 1e3:9.2f} {lo / base_lo:7.2f} {wh * 1e3:9.2f} {wh / base_wh:7.2f}")


if __name__ == "__main__":
    main()
