"""Command line: ``python -m auxnb settings | run | sweep``.

It is the only place in the package that prints; everything it prints comes from return values.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _ints(text: str) -> list[int]:
    if "-" in text and "," not in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",") if s]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auxnb", description="Bi-level auxiliary learning experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("settings", help="list the experiment settings")
    sub.add_parser("methods", help="list the methods")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--scale", choices=("smoke", "small", "paper"), default=None,
                        help="default: $AUXNB_SCALE, else paper on CUDA and small on CPU")
    common.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: $AUXNB_DEVICE or CUDA when available)")
    common.add_argument("--data-root", default=None, help="datasets directory (default: $AUXNB_DATA or ~/.cache/auxnb)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a knob, e.g. label_fraction=0.1")
    common.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p_run = sub.add_parser("run", parents=[common], help="train one method on one setting")
    p_run.add_argument("setting")
    p_run.add_argument("--method", default="stl")
    p_run.add_argument("--seed", type=int, default=0)
    p_run.add_argument("--checkpoint-dir", default=None)
    p_run.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint in --checkpoint-dir (an error when there is none)")
    p_run.add_argument("--allow-fresh", action="store_true",
                       help="with --resume: start from scratch when --checkpoint-dir holds no checkpoint yet")

    p_sweep = sub.add_parser("sweep", parents=[common], help="methods × seeds on settings; writes a CSV")
    p_sweep.add_argument("settings", help="comma-separated setting names")
    p_sweep.add_argument("--methods", default="stl,equal")
    p_sweep.add_argument("--seeds", default="0,1,2", help="e.g. 0,1,2 or 0-4")
    p_sweep.add_argument("--out", default="results.csv", help="tidy CSV of all runs")
    p_sweep.add_argument("--runs-dir", default=None, help="one CSV per finished run; an interrupted sweep resumes from it")
    p_sweep.add_argument("--retries", type=int, default=0, help="try a failing run again this many times before recording it as failed")
    p_sweep.add_argument("--no-divergence-guard", action="store_true",
                         help="do not stop runs whose training loss explodes (on by default: 10x the initial loss for 2 evaluations)")

    args = parser.parse_args(argv)
    from . import experiments, methods

    try:
        if args.command == "settings":
            print(experiments.settings().to_string(index=False))
            return 0
        if args.command == "methods":
            print("\n".join(methods.names()))
            return 0
        overrides = _parse_sets(args.set)
        if args.command == "run":
            if args.allow_fresh and not args.resume:
                raise ValueError("--allow-fresh only applies with --resume.")
            if args.resume and args.checkpoint_dir is None:
                raise ValueError("--resume needs --checkpoint-dir (the directory of the run's checkpoint.pt).")
            result = experiments.run(
                args.setting, args.method, seed=args.seed, scale=args.scale, data_root=args.data_root,
                device=args.device, progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                resume=("auto" if args.allow_fresh else True) if args.resume else False, **overrides,
            )
            m = result.metric_name
            print(f"setting={args.setting} method={args.method} seed={args.seed} scale={result.config['scale']}")
            print(f"val_{m}={result.val_metric:.4f} test_{m}={result.test_metric:.4f} "
                  f"best_step={result.best_step} seconds={result.timings['total_s']:.1f}")
            return 0
        if args.command == "sweep":
            table = experiments.sweep(
                args.settings.split(","), args.methods.split(","), _ints(args.seeds), scale=args.scale,
                out_dir=args.runs_dir, out=args.out, data_root=args.data_root, device=args.device,
                progress=not args.no_progress, retries=args.retries,
                divergence=None if args.no_divergence_guard else (10.0, 2), **overrides,
            )
            print(experiments.summarize(table).to_string(index=False))
            print(f"wrote {args.out}")
            failed = table[table["status"] == "failed"]
            for _, row in failed.iterrows():
                print(f"failed: {row['setting']} {row['method']} seed={row['seed']}: {row['error']}", file=sys.stderr)
            return 1 if len(failed) else 0
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
