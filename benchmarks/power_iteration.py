"""The ``hyper_lr="auto"`` λ_max estimate of a bi-level run: Rayleigh quotients after each Jᵀu product, from a
random start and from the lower direction g, at every estimate of one real run (issue 22's cost).

The run itself is unchanged: at each estimate the two sequences are computed on the same J, then the
method's own estimate (its `UpperLevel.auto_tol`, start g) is returned to it.

    python benchmarks/power_iteration.py --case noise40-long --config jtds-sgd-warm --calls 3 --products 40

Cases and configurations are `benchmarks/methods_learn.py`'s. Prints one line per start and estimate,
and the products the current rule (stop at a relative change below ``--tol``) would take from each start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sequence(operator, start, products: int) -> list[float]:
    from auxnb import hypergrad as hg

    x = tuple(torch._foreach_div(list(start), float(hg._norm(start))))
    out = []
    for _ in range(products):
        y = operator(x)
        out.append(float(hg._dot(x, y)))
        x = tuple(torch._foreach_div(list(y), float(hg._norm(y))))
    return out


def stop_at(values: list[float], tol: float) -> tuple[int, float]:
    """(products, estimate) of `auxnb.hypergrad._power_iteration`'s stopping rule ``|r_k − r_{k−1}| ≤ tol·|r_k|``
    applied to a recorded sequence (all of it when the rule never fires)."""
    previous = 0.0
    for k, v in enumerate(values, 1):
        if abs(v - previous) <= tol * abs(v):
            return k, v
        previous = v
    return len(values), values[-1]


def main(argv: list[str] | None = None) -> int:
    import methods_learn as ml

    from auxnb import hypergrad as hg
    from auxnb.experiments import run
    from auxnb.methods import bilevel

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="noise40-long", help=f"one of {', '.join(ml.CASES)}")
    parser.add_argument("--config", default="jtds-sgd-warm", help="a methods_learn.py configuration with hyper_lr='auto'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calls", type=int, default=3, help="stop the run after this many estimates")
    parser.add_argument("--products", type=int, default=40, help="products per sequence")
    parser.add_argument("--tol", type=float, default=1e-2)
    args = parser.parse_args(argv)
    if args.case not in ml.CASES or args.config not in ml.CONFIGS:
        parser.error(f"--case one of {list(ml.CASES)}, --config one of {list(ml.CONFIGS)}")
    torch.set_num_threads(1)
    calls = []
    original = bilevel.largest_eigenvalue

    class Done(Exception):
        pass

    def recorded(inner, params, generator=None, **kwargs):
        inner, params = tuple(inner), tuple(params)
        operator = hg._transpose_matvec(inner, params)
        starts = {"random": hg._random_like(params, torch.Generator().manual_seed(len(calls))),
                  "g": tuple(g.detach() for g in inner)}
        for name, start in starts.items():
            values = sequence(operator, start, args.products)
            k, v = stop_at(values, args.tol)
            print(f"estimate {len(calls) + 1}, start {name:6s}: " + ", ".join(f"{x:.3f}" for x in values)
                  + f"  | tol {args.tol:g}: {k} products, {v:.3f}", flush=True)
        calls.append(1)
        if len(calls) >= args.calls:
            raise Done
        return original(inner, params, generator=generator, **kwargs)

    bilevel.largest_eigenvalue = recorded
    setting, overrides = ml.CASES[args.case]
    try:
        run(setting, ml.make_method(args.config, args.case, "small"), seed=args.seed, scale="small", device="cpu",
            progress=False, **overrides)
    except Done:
        pass
    finally:
        bilevel.largest_eigenvalue = original
    if not calls:
        print("the run made no λ_max estimate (is hyper_lr='auto'?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
