"""Command line: ``python -m auxnb settings | methods | run | sweep | plan``.

It is the only place in the package that prints; everything it prints comes from return values.
A user's mistake ends in one ``error: ...`` line naming the problem and the fix (exit status 2),
never a traceback (``AUXNB_TRACEBACK=1`` shows it, for debugging auxnb itself). Building the
parser imports no torch, so ``--help`` is instant.

Each subcommand is one entry of `COMMANDS`: a function that adds its parser and a function that
runs it; adding a subcommand means adding one entry.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Callable, Sequence

from .cli_format import fill as _fill
from .cli_format import width as _width  # no line this module prints is wider than the terminal (80 off a TTY)


class UsageError(ValueError):
    """A user's mistake found by the command line itself."""


# ------------------------------------------------------------------ argument types
def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"``, ``"0-4"`` or a mix (``"0-2,5"``) -> the seeds, in order, each once.

    Example:
        >>> parse_seeds("0-2,5")
        [0, 1, 2, 5]
    """
    seeds: list[int] = []
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}; give e.g. 0,1,2 or 0-4 or 0-2,5.")
    for part in parts:
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise argparse.ArgumentTypeError(
                        f"the range {part!r} is empty (it counts down); write it low-high, e.g. {b}-{a}."
                    )
                values = list(range(a, b + 1))
            else:
                values = [int(part)]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a seed or a range of seeds; give integers such as 0,1,2 or 0-4 or 0-2,5."
            ) from None
        seeds += [v for v in values if v not in seeds]
    return [_seed(s) for s in seeds]


def _seed(value: int | str) -> int:
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {value!r} is not an integer; give e.g. --seed 0.") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"seed {seed} is out of range; use an integer in 0 … 2**63-1.")
    return seed


def _positive(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give e.g. {option} 2.") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} is not >= 1; give a positive count.")
        return value

    return parse


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    from .info import OVERRIDES

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}; e.g. --set label_fraction=0.1.")
        if key not in OVERRIDES:
            raise UsageError(
                f"--set {key}: unknown key; valid keys: {', '.join(sorted(OVERRIDES))} "
                "(see python -m auxnb run --help)."
            )
        out[key] = value.strip()
    return out


def _set_keys_help() -> str:
    from .info import OVERRIDES

    lines = ["valid --set keys (KEY=VALUE, repeatable):"]
    width = max(len(k) for k in OVERRIDES) + 2
    for key, (kind, meaning) in OVERRIDES.items():
        body = textwrap.wrap(f"{kind.__name__}: {meaning}", _width() - width - 4)
        lines.append(f"  {key:<{width}}{body[0]}")
        lines += [" " * (width + 2) + more for more in body[1:]]
    return "\n".join(lines)


def _check_out_file(path: str | None, option: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path!r} is a directory; give a file name such as results.csv.")
    if not p.parent.exists():
        raise UsageError(f"{option} {path!r}: folder {str(p.parent)!r} does not exist; create it first.")


# ------------------------------------------------------------------ tables
def _table(rows: list[dict[str, str]], wrap: str | None = None, width: int | None = None) -> str:
    """A plain text table no wider than `width` (default: the terminal's); see `auxnb.cli_format.table`."""
    from .cli_format import table

    return table(rows, wrap=wrap, cols=width)


# ------------------------------------------------------------------ subcommands
def _add_settings(sub, common) -> None:
    sub.add_parser("settings", help="list the experiment settings: data, offline or not, what each reproduces",
                   description="List the named experiment settings. 'offline' = yes: the data is bundled or "
                   "already on disk, so the setting runs without internet.")


def _cmd_settings(args) -> int:
    from . import experiments
    from .experiments.protocols import SETTING_DATA

    rows = []
    for s in experiments.settings().itertuples():
        data = SETTING_DATA.get(s.setting)
        rows.append({
            "setting": s.setting,
            "offline": "yes" if experiments.data_available(s.setting) else "no",
            "data": ", ".join(data) if data else "bundled",
            "reproduces": s.reproduces or "-",
        })
    print(_table(rows, wrap="reproduces"))
    print(textwrap.fill(
        "offline=no: put the dataset under $AUXNB_DATA (default ~/.cache/auxnb; running the setting names "
        "the expected files) or add --set download=True where the dataset allows it. Descriptions: "
        "auxnb.experiments.settings() in Python.", _width()))
    return 0


def _add_methods(sub, common) -> None:
    sub.add_parser("methods", help="list the methods with a one-line description and their paper")


def _cmd_methods(args) -> int:
    from . import methods
    from .info import METHODS

    rows = []
    for name in methods.names():
        what, paper = METHODS.get(name, ((methods.get(name).__doc__ or "").strip().split("\n")[0], ""))
        rows.append({"method": name, "what it does": what, "paper": paper})
    print(_table(rows, wrap="what it does"))
    return 0


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--scale", choices=("smoke", "small", "paper"), default=None,
                        help="smoke (seconds), small (CPU minutes) or paper (the published protocol); "
                        "default: $AUXNB_SCALE, else paper with CUDA and small without")
    common.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N (default: $AUXNB_DEVICE, else CUDA when available)")
    common.add_argument("--data-root", default=None, help="datasets directory (default: $AUXNB_DATA or ~/.cache/auxnb)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a knob, e.g. --set label_fraction=0.1 (repeatable; keys listed below)")
    common.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help="CPU threads (default: $AUXNB_THREADS, else 1, which a shared machine needs; "
                        "0: torch's default, one per core)")
    common.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return common


def _threads(text: str) -> int:
    from .runtime import _parse

    try:
        return _parse(text, "--threads")
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _use_threads(args) -> int:
    """--threads N sets $AUXNB_THREADS for this process (and the sweep's workers); returns the threads used."""
    from .runtime import THREADS_ENV, resolve_threads

    if args.threads is not None:
        os.environ[THREADS_ENV] = str(args.threads)
    return resolve_threads()  # a bad $AUXNB_THREADS is an error here, before any work


def _add_run(sub, common) -> None:
    p = sub.add_parser("run", parents=[common], help="train one method on one setting and print val/test metrics",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_set_keys_help())
    p.add_argument("setting", help="a setting name (python -m auxnb settings lists them), e.g. digits-rotation")
    p.add_argument("--method", default="stl", help="a method name (python -m auxnb methods lists them); default: stl")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data split, initialisation and batches; default: 0")
    p.add_argument("--checkpoint-dir", default=None, help="write a checkpoint there at every evaluation")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir (an error when there is none: a misspelled folder "
                        "never silently starts over; a checkpoint of another run is refused)")
    p.add_argument("--allow-fresh", action="store_true",
                   help="with --resume: start from scratch when --checkpoint-dir holds no checkpoint yet")
    _add_guard(p)


def _add_guard(p, default: str = "auto") -> None:
    said = ("default auto: stl+equal for maoal, jtds and dtg, none for the other methods" if default == "auto" else
            "default none: a sweep measures each method alone (its rows are what the methods do); auto: "
            "stl+equal for maoal, jtds and dtg, reusing the sweep's own stl and equal rows")
    p.add_argument("--guard", choices=("auto", "stl+equal", "stl", "none"), default=default, metavar="GUARD",
                   help="auto, stl+equal, stl or none. The do-no-harm guard: also train STL (and Equal) and keep the simplest run no more complex one "
                        "beats on validation by more than --guard-margin; none: the method alone; " + said)
    p.add_argument("--guard-margin", type=float, default=None, metavar="M",
                   help="the guard's margin in validation-metric units (default 0.01 = one point of accuracy)")
    p.add_argument("--guard-drop", default=None, metavar="auto|BOUND",
                   help="train the guard's runs in lockstep and stop one trailing the leader on validation by more than "
                        "BOUND in the second half of the run (auto: the margin plus 2 sd of validation noise); default: off")


def _guard(args) -> tuple[str | None, float | None]:
    from .selection import check_guard, check_margin

    guard = args.guard if args.guard == "auto" else check_guard(args.guard)
    margin = None if args.guard_margin is None else check_margin(args.guard_margin, "--guard-margin")
    return guard, margin


def _guard_drop(args) -> float | str | None:
    if args.guard_drop is None or args.guard_drop == "auto":
        return args.guard_drop
    try:
        value = float(args.guard_drop)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"--guard-drop {args.guard_drop!r}: give 'auto' or a number >= 0 (validation-metric units).")
    return value


def _check_device(device: str | None) -> None:
    from .train import resolve_device

    resolve_device(device)


def _cmd_run(args) -> int:
    from . import experiments

    overrides = _parse_sets(args.set)
    if args.resume and args.checkpoint_dir is None:
        raise UsageError("--resume needs --checkpoint-dir (the folder of the run to continue).")
    if args.allow_fresh and not args.resume:
        raise UsageError("--allow-fresh only applies with --resume.")
    _check_device(args.device)
    threads = _use_threads(args)
    scale = args.scale or experiments.default_scale()
    experiments.resolve_config(args.setting, scale, overrides)  # every knob checked before any work
    experiments.get_setting(args.setting)
    from .methods import get as get_method

    get_method(args.method)
    guard, margin = _guard(args)
    result = experiments.run(
        args.setting, args.method, seed=args.seed, scale=scale, data_root=args.data_root,
        device=args.device, progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
        resume=("auto" if args.allow_fresh else True) if args.resume else False, guard=guard, guard_margin=margin,
        guard_drop=_guard_drop(args), **overrides,
    )
    from .cli_format import fill, run_block

    print(run_block(result, setting=args.setting, method=args.method, seed=args.seed, threads=threads))
    note = __import__("auxnb.experiments.protocols", fromlist=["x"]).fixture_data_note(args.setting, result.config, args.data_root)
    if note:  # issue 26: smoke says which data it read
        print(fill(note))
    from .selection import describe

    kept = describe(result)
    if kept is not None:  # a guarded run says which run it kept and why
        print(fill(kept))
    return 0


def _add_sweep(sub, common) -> None:
    p = sub.add_parser("sweep", parents=[common], help="methods × seeds on settings; writes a CSV",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_set_keys_help())
    p.add_argument("settings", help="comma-separated setting names, e.g. digits-rotation,digits-mnist")
    p.add_argument("--methods", default="stl,equal",
                   help="comma-separated method names, each optionally with keyword arguments, e.g. "
                        "'stl,maoal(lower_steps=5,upper_lr=0.01)'; default: stl,equal")
    p.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2], help="e.g. 0,1,2 or 0-4 or 0-2,5; default: 0,1,2")
    p.add_argument("--out", default="results.csv", help="tidy CSV of all runs; default: results.csv")
    p.add_argument("--runs-dir", default=None, help="one CSV per finished run; an interrupted sweep resumes from it")
    p.add_argument("--executor", choices=("local", "processes", "ray"), default="local", metavar="EXECUTOR",
                   help="local: one run after another; processes: --jobs at once here; ray: Ray tasks ($RAY_ADDRESS or local)")
    p.add_argument("--jobs", type=_positive("--jobs"), default=None,
                   help="concurrent runs for --executor processes (default: GPUs × runs-per-gpu, else CPU cores)")
    p.add_argument("--runs-per-gpu", type=_positive("--runs-per-gpu"), default=1, help="runs packed on each GPU (processes, ray)")
    p.add_argument("--retries", type=int, default=0, help="try a failing run again this many times before recording it as failed")
    p.add_argument("--no-divergence-guard", action="store_true",
                   help="do not stop runs whose training loss explodes (default: stop at 10x the initial loss for 2 evaluations)")
    _add_guard(p, default="none")


def _names(text: str, option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"{option} is empty; give comma-separated names.")
    return names


def _method_specs(text: str) -> list:
    """``--methods``: names, or ``name(key=value, ...)`` with Python literal values, comma-separated."""
    import ast

    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth != 0:
        raise UsageError(f"--methods {text!r}: unbalanced parentheses.")
    specs = []
    for item in (i for i in items if i):
        if "(" not in item:
            specs.append(item)
            continue
        hint = "write name(key=value, ...) with Python literals, e.g. maoal(lower_steps=5,upper_lr=0.01)"
        try:
            call = ast.parse(item, mode="eval").body
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args
                    and all(k.arg for k in call.keywords)):
                raise ValueError
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except (SyntaxError, ValueError):
            raise UsageError(f"--methods: cannot read {item!r}; {hint}.") from None
        specs.append((call.func.id, kwargs))
    if not specs:
        raise UsageError("--methods is empty; give comma-separated names.")
    return specs


def _cmd_sweep(args) -> int:
    from . import experiments
    from .methods import get as get_method

    overrides = _parse_sets(args.set)
    settings, methods = _names(args.settings, "settings"), _method_specs(args.methods)
    _check_out_file(args.out, "--out")
    if args.runs_dir is not None and Path(args.runs_dir).is_file():
        raise UsageError(f"--runs-dir {args.runs_dir!r} is a file; give a folder (it is created if missing).")
    _check_device(args.device)
    _use_threads(args)
    scale = args.scale or experiments.default_scale()
    for s in settings:
        experiments.resolve_config(s, scale, overrides)
    for m in methods:
        get_method(m) if isinstance(m, str) else get_method(m[0], **m[1])
    experiments.method_entries(methods)  # duplicate labels: an error before any run
    guard, margin = _guard(args)
    table = experiments.sweep(
        settings, methods, args.seeds, scale=scale, out_dir=args.runs_dir, data_root=args.data_root,
        device=args.device, progress=not args.no_progress, executor=args.executor, jobs=args.jobs,
        runs_per_gpu=args.runs_per_gpu, out=args.out, retries=args.retries,
        divergence=None if args.no_divergence_guard else (10.0, 2), guard=guard, guard_margin=margin,
        guard_drop=_guard_drop(args), **overrides,
    )  # the table at --out is rewritten after each finished run
    from .cli_format import frame_table

    print(frame_table(experiments.summarize(table)))
    print(f"wrote {args.out}")
    for s in settings:  # issue 26: smoke says which data it read
        note = __import__("auxnb.experiments.protocols", fromlist=["x"]).fixture_data_note(s, experiments.resolve_config(s, scale, overrides), args.data_root)
        if note:
            print(_fill(f"{s}: {note}"))
    failed = table[table["status"] == "failed"]
    for _, row in failed.iterrows():
        print(f"failed: {row['setting']} {row['method']} seed={row['seed']}: {row['error']}", file=sys.stderr)
    return 1 if len(failed) else 0


def _add_plan(sub, common) -> None:
    # its own copy of the shared options: argparse's parents share their action objects, and plan
    # rewrites --scale's help below (with `common` itself, run's and sweep's help would say plan's)
    p = sub.add_parser("plan", parents=[_common_options()], help="estimate a paper table's runs, time and memory before running it",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_set_keys_help())
    p.add_argument("table", nargs="?", default=None, help="a paper table id (the [tags] of `settings`), e.g. maoal-table1")
    p.add_argument("--settings", default=None, help="comma-separated settings (instead of, or narrowing, the table)")
    p.add_argument("--methods", default=None, help="comma-separated methods (instead of, or narrowing, the table)")
    p.add_argument("--seeds", type=_positive("--seeds"), default=3, help="seeds per (setting, method); default: 3")
    p.add_argument("--probe-steps", type=_positive("--probe-steps"), default=2, help="lower steps timed per pair; default: 2")
    p.add_argument("--runs-per-gpu", type=_positive("--runs-per-gpu"), default=1, help="runs packed per GPU for the packed estimate")
    p.add_argument("--slots", type=_positive("--slots"), default=None, help="concurrent runs for the packed estimate")
    p.add_argument("--out", default=None, help="also write the table as CSV")
    for action in p._actions:  # plan's own default scale (the shared option's help names run's)
        if action.dest == "scale":
            action.help = ("the scale whose protocol is estimated: smoke, small or paper; default: paper "
                           "(not $AUXNB_SCALE: plan estimates the published protocol unless told otherwise)")


def _cmd_plan(args) -> int:
    from .experiments.plan import plan

    if args.table is None and (args.settings is None or args.methods is None):
        raise UsageError("give a paper table id (e.g. maoal-table1) or both --settings and --methods.")
    _check_out_file(args.out, "--out")
    _check_device(args.device)
    _use_threads(args)
    table = plan(
        args.table, settings=_names(args.settings, "--settings") if args.settings else None,
        methods=_names(args.methods, "--methods") if args.methods else None, seeds=args.seeds,
        scale=args.scale or "paper", device=args.device, probe_steps=args.probe_steps, slots=args.slots,
        runs_per_gpu=args.runs_per_gpu, data_root=args.data_root, **_parse_sets(args.set),
    )
    if args.out:  # atomically: a full disk leaves no 0-byte CSV (issue 26)
        __import__("auxnb.checkpoint", fromlist=["write_csv"]).write_csv(args.out, table)
    from .cli_format import fill, frame_table

    a = table.attrs
    print(frame_table(table, {"s_per_step": "{:.3f}", "peak_mb": "{:.0f}", "hours_sequential": "{:.2f}", "hours_packed": "{:.2f}"}))
    print(fill(f"total: {table['runs'].sum()} runs, {a['hours_sequential']:.2f} h sequential, {a['hours_packed']:.2f} h "
               f"packed on {a['slots']} slots ({a['device']}, {a['scale']} scale, {a['probe_steps']} probe steps)"))
    return 0


#: subcommand -> (add its parser, run it)
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "settings": (_add_settings, _cmd_settings),
    "methods": (_add_methods, _cmd_methods),
    "run": (_add_run, _cmd_run),
    "sweep": (_add_sweep, _cmd_sweep),
    "plan": (_add_plan, _cmd_plan),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m auxnb",
        description=_fill("Bi-level auxiliary learning experiments (MAOAL, JTDS, DTG-AuxL and baselines)."),
        epilog=_fill("e.g. python -m auxnb run digits-rotation --method maoal --set label_fraction=0.1"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    common = _common_options()
    for add, _ in COMMANDS.values():
        add(sub, common)
    return parser


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = str(text) or type(err).__name__
    return text if isinstance(err, (ValueError, TypeError, KeyError, RuntimeError, ConnectionError, FileNotFoundError)) else f"{type(err).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, LookupError, OSError, ImportError, RuntimeError, FloatingPointError) as err:
        if os.environ.get("AUXNB_TRACEBACK"):
            raise
        print(f"error: {_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
