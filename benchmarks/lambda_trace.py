"""How λ_max(J), the largest eigenvalue behind ``hyper_lr="auto"`` (η = auto_target / λ_max), moves over a run.

Trains `JTDS()` (the no_harm.py entry's configuration) alone on one of `benchmarks/no_harm.py`'s cases with λ_max
estimated at *every* upper step (``auto_every=1``) and prints, per upper step, the lower step and the estimate
(power iteration from the lower direction g of that step's training batch). The default re-estimates every
`auto_every` = 10 upper slots and keeps η in between; this shows how much one estimate says about the next ones
(methods_learn.md §15). One run of the 10-epoch case takes about 6 minutes on one CPU thread.

    python benchmarks/lambda_trace.py --case f-noise-40%-long --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from no_harm import CASES, Entry, make_method  # noqa: E402


def trace(case: str, seed: int, scale: str = "small") -> dict:
    """One run with λ_max estimated at every upper step: ``{"seed", "test", "steps": [...], "lambda": [...]}``."""
    import torch

    torch.set_num_threads(1)
    from auxnb.experiments import run

    entry = Entry(case, "λ trace", CASES[case][2], "candidate", CASES[case][2], {"auto_every": 1})
    method = make_method(entry, scale)
    steps: list[int] = []
    lams: list[float] = []
    upper_step = method.upper_step

    def recorded(model, context):
        info = upper_step(model, context)
        if "lambda_max" in info:
            steps.append(int(context.step))
            lams.append(float(info["lambda_max"]))
        return info

    method.upper_step = recorded  # the instance's own step, wrapped: nothing else changes
    setting, overrides, _ = CASES[case]
    result = run(setting, method, seed=seed, scale=scale, device="cpu", progress=False, guard=None, **overrides)
    return {"case": case, "seed": seed, "test": result.test_metric, "steps": steps, "lambda": lams}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="f-noise-40%-long", choices=[c for c, v in CASES.items() if v[2] == "jtds"])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--json", default=None, help="also write the traces here")
    args = parser.parse_args(argv)
    out = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t = trace(args.case, seed)
        out.append(t)
        lam = t["lambda"]
        print(f"seed {seed}: test {100 * t['test']:.1f} %, {len(lam)} estimates")
        print("  lower step: " + " ".join(f"{s:>5d}" for s in t["steps"]))
        print("  λ_max:      " + " ".join(f"{x:5.0f}" for x in lam))
        first = lam[0]
        print(f"  later / first: median {statistics.median(x / first for x in lam[1:]):.2f}, "
              f"range {min(x / first for x in lam[1:]):.2f}-{max(x / first for x in lam[1:]):.2f}; "
              f"consecutive estimates differ by a median {statistics.median(abs(b / a - 1) for a, b in zip(lam, lam[1:])):.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
