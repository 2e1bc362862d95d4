"""Does φ move? MAOAL's importance α of a strong L2 auxiliary loss on digits, paper text vs authors' code.

The papers' series is ``−η·vᵀ Σ (I − ηJ)^i ∂g/∂α`` with η the lower learning rate; the authors' code
(MAOAL ``gauxlearn/implicit_diff.py``, run with ``hpo_lr=1.0``) sums ``Σ_{i=0..3} (I − J)^i`` with no
leading η and clips at 10. This script trains MAOAL on ``digits-rotation`` with the rotation task
switched off and ``l2_penalty`` as the only auxiliary loss, once with ``MAOAL.paper_text(experiment)``
("before": what auxnb's ``paper`` scale ran until issue 12) and once with ``MAOAL.paper(experiment)``
("after": the authors' configuration, now the ``paper`` scale), and prints the α trajectory of both.

    python benchmarks/phi_motion.py                      # rating-data presets (SGD 1e-3 on α), L2 scale 1e-2
    python benchmarks/phi_motion.py --experiment cifar   # the digits paper scale's own presets (Adam 1e-2 on α)

Lower level: the digits ``paper`` scale (SGD 0.01, momentum 0.9, cosine) with fewer epochs and batch 64.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from auxnb import experiments  # noqa: E402
from auxnb.methods import MAOAL, l2_penalty  # noqa: E402


def trajectory(method: MAOAL, *, epochs: int, batch_size: int, seed: int) -> tuple[list[dict], float, float]:
    """Train on digits-rotation; return the α rows over time (step, mean/min/max and per module), the test metric, seconds."""
    start = time.perf_counter()
    result = experiments.run(
        "digits-rotation", method, seed=seed, scale="paper", device="cpu", progress=False,
        epochs=epochs, batch_size=batch_size, eval_every=method.lower_steps,
    )
    rows = []
    for entry in result.trace:
        alpha = entry.get("importance")
        if alpha is None:
            continue
        values = alpha[0]  # one auxiliary loss (l2): one row of α
        rows.append({"step": entry["step"], "mean": sum(values) / len(values), "min": min(values), "max": max(values),
                     "modules": values, "groups": entry.get("importance_groups")})
    return rows, float(result.test_metric), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="movielens", help="MAOAL experiment whose presets to use (default movielens)")
    parser.add_argument("--l2", type=float, default=1e-2, help="scale of l2_penalty over every parameter (default 1e-2)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=5, help="print every this many upper steps")
    args = parser.parse_args()
    torch.set_num_threads(1)

    common = {"aux_tasks": [], "aux_losses": {"l2": l2_penalty(scale=args.l2)}}
    runs = {
        "before (paper text)": MAOAL.paper_text(args.experiment, **common),
        "after (authors' code = paper scale)": MAOAL.paper(args.experiment, **common),
    }
    print(f"digits-rotation, rotation off, aux = l2_penalty(scale={args.l2}) over all parameters; "
          f"lower: SGD 0.01 momentum 0.9 cosine, {args.epochs} epochs, batch {args.batch_size}; seed {args.seed}")
    for label, method in runs.items():
        u = method.upper
        print(f"\n== {label}: MAOAL.{'paper_text' if 'text' in label else 'paper'}({args.experiment!r})")
        print(f"   T={u.lower_steps} terms={u.terms} hyper_lr={u.hyper_lr} leading_eta={u.leading_eta} clip={u.clip} "
              f"{u.upper_optimizer} lr={u.upper_lr} momentum={u.upper_momentum} nonneg={method.nonneg}")
        rows, test, seconds = trajectory(method, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        print(f"   {'upper step':>10} {'lower step':>10} {'mean α':>12} {'min α':>12} {'max α':>12}")
        for i, row in enumerate(rows):
            if i % args.every == 0 or i == len(rows) - 1:
                print(f"   {i + 1:>10} {row['step']:>10} {row['mean']:>12.6f} {row['min']:>12.6f} {row['max']:>12.6f}")
        last = rows[-1]
        moved = max(abs(v - 1.0) for v in last["modules"])
        print(f"   final α per module: " + ", ".join(f"{g}={v:.4f}" for g, v in zip(last["groups"], last["modules"])))
        print(f"   largest |α − 1| = {moved:.3g}; test accuracy {100 * test:.1f} %; {seconds:.0f} s")


if __name__ == "__main__":
    main()
