"""The machinery behind `auxnb.experiments`: the setting registry, config resolution, run and sweep.

Overrides are type-checked against `OVERRIDES`; an unknown setting, method, scale or key is an
error that lists the valid ones. Nothing here selects on test metrics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from ..data.core import DataBundle
from ..data.sources import data_root as resolve_data_root
from ..info import OVERRIDES as _INFO_OVERRIDES
from ..methods import Method
from ..methods import get as get_method
from ..train import RunResult, Trainer, resolve_device
from ..selection import resolve_guard
from .applicability import check_applicable

__all__ = [
    "Setting", "settings", "get_setting", "register_setting", "run", "sweep", "summarize",
    "resolve_config", "default_scale", "SCALES", "OVERRIDES", "summary_table", "SweepWarning", "check_sweep_outputs",
    "method_entries",
    "setting_cases",
]

SCALES = ("smoke", "small", "paper")

#: Knobs a user may override, with their types and meaning (kept torch-free in `auxnb.info` for the CLI).
OVERRIDES: dict[str, tuple[type, str]] = _INFO_OVERRIDES

_TRAINER_KEYS = (
    "epochs", "steps", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "scheduler",
    "eval_every", "freeze_aux_buffers", "grad_clip",
)


@dataclass(frozen=True)
class Setting:
    """A named experiment: data, model and the training protocol at each scale.

    Args:
        name: registry name (``digits-rotation``).
        description: one paragraph: primary task, auxiliary task(s), protocol.
        reproduces: which paper table/figure it follows ("" when none).
        build: ``config -> (DataBundle, model)``; `config` holds the resolved knobs plus
            ``seed`` and ``data_root``.
        scales: scale -> default knobs (trainer and data) at that scale.
        method_defaults: method name -> scale -> keyword arguments for the method.
    """

    name: str
    description: str
    build: Callable[[Mapping[str, Any]], tuple[DataBundle, nn.Module]]
    scales: Mapping[str, Mapping[str, Any]]
    reproduces: str = ""
    method_defaults: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)

    def config(self, scale: str, **overrides: Any) -> dict[str, Any]:
        return resolve_config(self, scale, overrides)


_SETTINGS: dict[str, Setting] = {}


def register_setting(setting: Setting) -> Setting:
    missing = [s for s in SCALES if s not in setting.scales]
    if missing:
        raise ValueError(f"Setting {setting.name!r} lacks scales {missing}.")
    _SETTINGS[setting.name] = setting
    return setting


def settings() -> pd.DataFrame:
    """The registered settings: name, what it reproduces, and its description."""
    return pd.DataFrame(
        [{"setting": s.name, "reproduces": s.reproduces, "description": s.description} for s in _SETTINGS.values()]
    )


def get_setting(name: str | Setting) -> Setting:
    if isinstance(name, Setting):
        return name
    try:
        return _SETTINGS[name]
    except KeyError:
        raise ValueError(f"Unknown setting {name!r}; valid settings: {', '.join(_SETTINGS)}.") from None


def default_scale() -> str:
    """``$AUXNB_SCALE`` if set, else ``paper`` on a CUDA machine and ``small`` on a CPU."""
    scale = os.environ.get("AUXNB_SCALE") or ("paper" if torch.cuda.is_available() else "small")
    if scale not in SCALES:
        raise ValueError(f"AUXNB_SCALE={scale!r} is not a scale; use one of {', '.join(SCALES)}.")
    return scale


def _coerce(key: str, value: Any) -> Any:
    if key not in OVERRIDES:
        raise ValueError(f"Unknown override {key!r}; valid overrides: {', '.join(sorted(OVERRIDES))}.")
    kind, meaning = OVERRIDES[key]
    if value is None:
        return None
    if key == "grad_clip" and isinstance(value, str) and value.strip().lower() in ("none", "off"):
        return None
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        try:
            if kind is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text in ("true", "1", "yes")
            return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
        except ValueError:
            raise TypeError(f"Override {key}={value!r}: expected {kind.__name__} ({meaning}).") from None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise TypeError(f"Override {key}={value!r}: expected {kind.__name__} ({meaning}), got {type(value).__name__}.")
    return value


def resolve_config(setting: Setting | str, scale: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The scale's defaults with `overrides` applied (each checked against `OVERRIDES`)."""
    setting = get_setting(setting)
    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r}; use one of {', '.join(SCALES)}.")
    config = dict(setting.scales[scale])
    for key, value in (overrides or {}).items():
        config[key] = _coerce(key, value)
    if config.get("scheduler") == "none":
        config["scheduler"] = None
    for key, lo, hi in (("label_fraction", 0.0, 1.0), ("label_noise", 0.0, 1.0)):
        v = config.get(key)
        if v is not None and not (lo <= v <= hi) or (key == "label_fraction" and v == 0.0):
            raise ValueError(f"Override {key}={v}: must lie in ({lo}, {hi}]" if key == "label_fraction" else f"Override {key}={v}: must lie in [{lo}, {hi}].")
    for key in ("epochs", "steps", "batch_size", "shots"):
        v = config.get(key)
        if v is not None and v < 1:
            raise ValueError(f"Override {key}={v}: must be >= 1.")
    if config.get("grad_clip") is not None and not config["grad_clip"] >= 0:
        raise ValueError(f"Override grad_clip={config['grad_clip']}: must be >= 0 (or 'none' for no clipping).")
    if config.get("dev_size") is not None and config["dev_size"] < 0:
        raise ValueError(f"Override dev_size={config['dev_size']}: must be >= 0.")
    return config


def run(
    setting: str | Setting,
    method: str | Method,
    seed: int = 0,
    scale: str | None = None,
    data_root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    method_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[str, dict], None]] = (),
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool | str = False,
    divergence: tuple[float, int] | None = None,
    guard: str | None = "auto",
    guard_margin: float | None = None,
    reuse: Mapping[str, RunResult] | None = None,
    guard_drop: float | str | None = None,
    **overrides: Any,
) -> RunResult:
    """Train one method on one setting with one seed; returns the `RunResult`.

    `guard` is the do-no-harm guard (`auxnb.selection`): ``"stl+equal"`` trains the method, STL and
    Equal as candidates and keeps the simplest that no more complex one beats on D_val by more than
    `guard_margin` (default 0.01); ``"stl"`` only STL beside the method; ``None`` the method alone.
    The default ``"auto"`` is ``"stl+equal"`` for MAOAL, JTDS and DTG and None for every other
    method, at every scale: alone, those methods still lose to STL or Equal on most real cases
    beyond digits rotation (``benchmarks/results/no_harm*.csv``), so a run of them is guarded
    unless asked otherwise (``guard=None`` for the method alone, e.g. to compare with a paper).
    What the guard kept and every candidate's D_val is in ``result.config["selection"]``
    (`auxnb.selection.describe`), every candidate's own result in ``result.candidates``. A
    method built with the deprecated ``fallback=`` keyword keeps that choice when `guard` is
    ``"auto"``. `reuse` (``{"stl": result, "equal": result}``) hands the guard finished runs it
    takes instead of training those candidates, when each is exactly that run (`Trainer`'s
    ``reuse``; `sweep` does this with its own STL and Equal rows). `guard_drop` (off by default)
    trains the guard's candidates in lockstep and stops a hopeless one early (`Trainer`'s
    ``guard_drop``, `auxnb.selection.drop_bound`).

    Example:
        >>> r = run("digits-rotation", "stl", scale="smoke", progress=False, device="cpu")
        >>> 0.0 <= r.test_metric <= 1.0
        True
    """
    setting = get_setting(setting)
    name = method if isinstance(method, str) else method.name
    check_applicable(setting.name, name)  # a refused pair is an error before any work (issue 12)
    scale = scale or default_scale()
    config = resolve_config(setting, scale, overrides)
    torch.manual_seed(seed)
    bundle, model = setting.build({**config, "seed": seed, "data_root": data_root})
    kwargs = dict(setting.method_defaults.get(name, {}).get(scale, {}))
    kwargs.update(method_kwargs or {})
    method_obj = get_method(method, **kwargs) if isinstance(method, str) else get_method(method)
    legacy = getattr(method_obj, "_legacy_guard", None)  # MAOAL(fallback=...): the old spelling
    if isinstance(guard, str) and guard == "auto" and legacy is not None:
        guard, guard_margin = legacy if guard_margin is None else (legacy[0], guard_margin)
    guard = resolve_guard(guard, method_obj)
    trainer = Trainer(
        model,
        method_obj,
        bundle,
        seed=seed,
        device=resolve_device(device),
        progress=progress,
        callbacks=callbacks,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        config={
            "setting": setting.name, "scale": scale, "overrides": dict(overrides),
            # where the numbers come from: "FIXTURE: ..." marks fixture files, never the real dataset
            "data_source": bundle.info.get("source"), "fixture": bool(bundle.info.get("fixture", False)),
            "data_root": str(resolve_data_root(data_root).absolute()),
        },
        divergence=divergence,
        guard=guard,
        guard_margin=guard_margin,
        reuse=reuse,
        guard_drop=guard_drop,
        **{k: config[k] for k in _TRAINER_KEYS if k in config},
    )
    return trainer.fit()


def _run_file(out_dir: Path, setting: str, method: str, seed: int, scale: str, overrides: Mapping[str, Any],
              data_root: str | os.PathLike | None = None, guard: Any = "auto", guard_margin: float | None = None,
              spec_key: str | None = None, guard_drop: float | str | None = None, setting_name: str | None = None) -> Path:
    # the scale, the overrides and the data root are part of a run's identity: a resumed sweep with
    # other knobs, or on other data, must not pick up results of a different protocol
    import hashlib

    from ..data.sources import data_root as resolve_root

    key = repr((scale, sorted((k, repr(v)) for k, v in overrides.items()), str(resolve_root(data_root).absolute())))
    if (guard, guard_margin, guard_drop) != ("auto", None, None):  # the default keeps earlier sweeps' file names
        key += repr(("guard", guard, guard_margin) + (() if guard_drop is None else (guard_drop,)))
    if spec_key is not None:  # a configured method: its configuration is part of the run
        key += spec_key
    if setting_name is not None and setting_name != setting:  # a labelled case: which setting it runs
        key += repr(("setting", setting_name))
    safe = [_file_safe(setting), _file_safe(method)]  # a label may hold "%", spaces or parentheses
    if safe != [setting, method]:  # two labels that read alike in a file name stay two files
        key += repr(("labels", setting, method))
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return out_dir / f"{safe[0]}__{safe[1]}__seed{seed}__{scale}-{digest}.csv"


def _file_safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


class SweepWarning(UserWarning):
    """Something a sweep recovered from (an unreadable per-run file re-run, a run that failed)."""


#: Columns of a sweep's table (one row per run; ``status`` is ``ok`` or ``failed``).
#: ``kept``: which candidate a selected run kept (the do-no-harm guard: the method's name, ``"stl"``
#: or ``"equal"``; HPO-tune: its trial); empty for a run of the method alone. ``seconds``: what
#: the row cost, every training included (a guarded run's STL and Equal, HPO-tune's trials).
SWEEP_COLUMNS = ("setting", "method", "seed", "scale", "metric", "val", "test", "best_step", "seconds", "data", "status", "error",
                 "kept")


def _unique(kind: str, values: list) -> list:
    seen, dups = set(), []
    for v in values:
        if v in seen and v not in dups:
            dups.append(v)
        seen.add(v)
    if dups:
        raise ValueError(f"Duplicate {kind} {dups} in the sweep; each (setting, method, seed) is run once, list each {kind[:-1]} once.")
    return values


def _writable_dir(path: Path, what: str) -> None:
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".auxnb-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what} {path} is not writable ({err.strerror or err}); choose another path.") from None


def check_sweep_outputs(out: str | os.PathLike | None, out_dir: str | os.PathLike | None) -> tuple[Path | None, Path | None]:
    """Validate the sweep's output paths before any training (a bad path must not cost the runs).

    `out` (the combined table) must not be a directory and its directory must exist and be
    writable; `out_dir` (one file per run) is created if needed and must be writable.
    """
    table = Path(out).expanduser() if out is not None else None
    runs = Path(out_dir).expanduser() if out_dir is not None else None
    if table is not None:
        if table.is_dir():
            raise ValueError(f"The sweep's table path {table} is a directory; give a file name such as {table / 'results.csv'}.")
        parent = table.parent if str(table.parent) else Path(".")
        if not parent.is_dir():
            raise ValueError(f"The directory of the sweep's table {table} does not exist ({parent}); create it or choose another path.")
        _writable_dir(parent, "The directory of the sweep's table")
        if table.exists() and not os.access(table, os.W_OK):
            raise ValueError(f"The sweep's table {table} exists and is not writable; choose another path.")
    if runs is not None:
        if runs.exists() and not runs.is_dir():
            raise ValueError(f"The per-run directory {runs} is a file; give a directory.")
        try:
            runs.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"Cannot create the per-run directory {runs} ({err.strerror or err}); choose another path.") from None
        _writable_dir(runs, "The per-run directory")
    return table, runs


def write_table(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write the sweep's table to `path` atomically (a killed sweep leaves the previous table whole)."""
    from ..checkpoint import write_csv  # writer-unique temporary name, "Disk full" on ENOSPC (issue 26)

    write_csv(path, pd.DataFrame(list(rows), columns=list(SWEEP_COLUMNS)))


def read_run_file(path: Path, setting: str, method: str, seed: int) -> tuple[dict[str, Any] | None, str]:
    """The finished run stored in `path`, or ``(None, why it cannot be used)``."""
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None, "empty"
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        return None, f"unreadable ({type(err).__name__})"
    if len(frame) != 1:
        return None, "header-only (no row)" if len(frame) == 0 else f"{len(frame)} rows instead of 1"
    row = frame.iloc[0].to_dict()
    missing = [c for c in ("setting", "method", "seed", "val", "test") if c not in row]
    if missing:
        return None, f"missing columns {missing}"
    if (row["setting"], row["method"], int(row["seed"])) != (setting, method, seed):
        return None, f"the row of another run ({row['setting']}, {row['method']}, seed {row['seed']})"
    if row.get("status", "ok") != "ok" or pd.isna(row["val"]) or pd.isna(row["test"]):
        return None, "not a finished run (no val/test metric)"
    row.setdefault("status", "ok")
    for col in ("error", "kept"):  # empty strings come back from CSV as NaN (or are missing in older files)
        row[col] = "" if pd.isna(row.get(col, "")) else row.get(col, "")
    return row, ""


def _checkpoint_dir(path: Path | None) -> Path | None:
    """Where the run of per-run file `path` checkpoints while it trains (removed once its row is written)."""
    return path.with_name(path.stem + ".ckpt") if path is not None else None


#: What `sweep` takes as one of its methods: a registered name, a configured `Method`, a registered
#: name with its keyword arguments ``(name, kwargs)``, or a labelled entry ``(label, Method)``,
#: ``(label, name)`` or ``(label, (name, kwargs))``.
MethodSpec = Any


def _plain_spec(spec: Any) -> bool:
    """A name, a `Method` or ``(name, kwargs)``: what a label may name."""
    return isinstance(spec, (str, Method)) or (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str)
                                               and isinstance(spec[1], Mapping))


def method_entries(methods: MethodSpec | Iterable[MethodSpec]) -> list[tuple[str, MethodSpec]]:
    """``(label, spec)`` for each of a sweep's methods; the label is the table's ``method`` column.

    A name is its own label; a `Method` is labelled by its name; ``(name, kwargs)`` by the name;
    ``(label, spec)`` by the label, where `spec` is a `Method`, a name or ``(name, kwargs)``
    (``("jtds-fast", ("jtds", {"lower_steps": 5}))``). Two entries with one label are an error
    (label one of them).

    Example:
        >>> from auxnb.methods import Equal
        >>> entries = ["stl", ("maoal", {"lower_steps": 5}), ("equal-2", Equal()), ("jtds-5", ("jtds", {"lower_steps": 5}))]
        >>> [label for label, _ in method_entries(entries)]
        ['stl', 'maoal', 'equal-2', 'jtds-5']
    """
    if _plain_spec(methods) or (isinstance(methods, tuple) and len(methods) == 2 and isinstance(methods[0], str)
                                and _plain_spec(methods[1])):
        methods = [methods]
    entries: list[tuple[str, MethodSpec]] = []
    for spec in methods:
        if isinstance(spec, str):
            entries.append((spec, spec))
        elif isinstance(spec, Method):
            entries.append((spec.name, spec))
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
            entries.append((spec[0], (spec[0], dict(spec[1]))))
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and _plain_spec(spec[1]):
            inner = spec[1]
            entries.append((spec[0], (inner[0], dict(inner[1])) if isinstance(inner, tuple) else inner))
        else:
            raise TypeError(
                f"A sweep's method must be a name ('maoal'), a Method (MAOAL(lower_steps=5)), (name, kwargs) "
                f"(('maoal', {{'lower_steps': 5}})) or a labelled one: (label, Method) (('maoal-fast', MAOAL(lower_steps=5))), "
                f"(label, name) or (label, (name, kwargs)); got {spec!r}."
            )
    labels = [label for label, _ in entries]
    dups = sorted({label for label in labels if labels.count(label) > 1})
    if dups:
        raise ValueError(f"Duplicate methods {dups} in the sweep; each (setting, method, seed) is run once. To compare two "
                         "configurations of one method, label them: ('maoal-a', MAOAL(...)), ('maoal-b', MAOAL(...)).")
    return entries


def setting_cases(settings: str | Iterable[str] | Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, setting, overrides)`` for each of a sweep's settings; the label is the table's ``setting`` column.

    A name is its own label with no overrides of its own; a mapping labels cases of a setting
    with their own overrides, ``{label: name}`` or ``{label: (name, overrides)}``, e.g. one
    setting at several label-noise rates:
    ``{"noise 0.2": ("fashion-rotation", {"label_noise": 0.2}), "noise 0.5": ("fashion-rotation", {"label_noise": 0.5})}``.

    Example:
        >>> setting_cases({"5-shot": ("digits-rotation", {"shots": 5}), "all": "digits-rotation"})
        [('5-shot', 'digits-rotation', {'shots': 5}), ('all', 'digits-rotation', {})]
    """
    if isinstance(settings, str):
        return [(settings, settings, {})]
    if isinstance(settings, Mapping):
        cases = []
        for label, value in settings.items():
            if not isinstance(label, str):
                raise TypeError(f"A sweep's case label must be a string, got {label!r}.")
            if isinstance(value, str):
                cases.append((label, value, {}))
            elif (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
                  and isinstance(value[1], Mapping) and all(isinstance(k, str) for k in value[1])):
                cases.append((label, value[0], dict(value[1])))
            else:
                raise TypeError(f"Case {label!r} of the sweep must be a setting name or (name, overrides), "
                                f"e.g. ('fashion-rotation', {{'label_noise': 0.2}}); got {value!r}.")
        return cases
    values = list(settings)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise TypeError(f"A sweep's settings are names, or a mapping {{label: (name, overrides)}} for cases with their own "
                        f"overrides; got {bad[0]!r} in a list.")
    return [(v, v, {}) for v in values]


def _method_of(spec: MethodSpec) -> tuple[str, Method]:
    """The registered name and a built `Method` of a sweep entry (to check it before any run)."""
    if isinstance(spec, str):
        return spec, get_method(spec)
    if isinstance(spec, Method):
        return spec.name, spec
    name, value = spec
    if isinstance(value, Method):
        return value.name, value
    return name, get_method(name, **value)


def _spec_key(spec: MethodSpec) -> str | None:
    """What a configured entry adds to its per-run file's identity (None for a plain name)."""
    if isinstance(spec, str):
        return None
    from ..checkpoint import describe_value

    name, method = _method_of(spec)
    if isinstance(spec, tuple) and isinstance(spec[1], Mapping):
        return repr((name, sorted((k, repr(describe_value(v))) for k, v in spec[1].items())))
    return repr((type(method).__name__, name, repr(describe_value(method.config()))))


def _sweep_row(
    setting: str, method: MethodSpec, seed: int, scale: str, data_root, device, progress: bool, overrides: Mapping[str, Any],
    path: str | None = None, retries: int = 0, divergence: tuple[float, int] | None = None,
    guard: Any = "auto", guard_margin: float | None = None, label: str | None = None, shared: dict | None = None,
    guard_drop: float | str | None = None, case: str | None = None, keep_result: bool = False,
) -> dict[str, Any]:
    """One run of a sweep, as its table row (module level: executors pickle it); never raises for a failing run.

    `case` is the row's ``setting`` label (default `setting`, the setting's name); with
    `keep_result` the row holds the run's `RunResult` under ``"_result"`` (the local executor).

    With a per-run file `path`, the run checkpoints next to it (``<file>.ckpt/``) and resumes from
    there, so a sweep killed in the middle of a long run loses at most one evaluation interval. A
    run that raises is retried `retries` times, then returned as a ``failed`` row with its error.

    `shared` (the local executor only): this setting and seed's finished STL and Equal runs, which a
    guarded run of the same setting and seed reuses as its candidates when they are exactly those runs.
    """
    import shutil
    import warnings

    from ..checkpoint import CheckpointError

    import copy

    ckpt = _checkpoint_dir(Path(path) if path is not None else None)
    error, attempts, restarted = "", 0, False
    label = label if label is not None else method if isinstance(method, str) else _method_of(method)[0]
    while attempts <= int(retries):
        try:
            # a configured Method is copied for each run: no run starts from another's learned state
            spec, method_kwargs = method, None
            if isinstance(method, Method):
                spec = copy.deepcopy(method)
            elif isinstance(method, tuple):
                spec, method_kwargs = (copy.deepcopy(method[1]), None) if isinstance(method[1], Method) else method
            if shared is not None and shared.get("key") != (case, setting, seed):
                shared.clear()  # the sweep runs a setting and seed's rows together: older runs are done with
                shared["key"], shared["runs"] = (case, setting, seed), {}
            result = run(setting, spec, seed=seed, scale=scale, data_root=data_root, device=device, progress=progress,
                         checkpoint_dir=ckpt, resume="auto" if ckpt is not None else False, divergence=divergence,
                         guard=guard, guard_margin=guard_margin, method_kwargs=method_kwargs, guard_drop=guard_drop,
                         reuse=None if shared is None else shared["runs"], **overrides)
            if shared is not None and label in ("stl", "equal") and isinstance(method, str):
                shared["runs"][label] = result
        except CheckpointError as err:
            error = f"{type(err).__name__}: {err}"
            if ckpt is not None and not restarted:  # the run's own checkpoint is unusable: start it afresh, once
                warnings.warn(f"{err} Restarting that run from scratch.", SweepWarning, stacklevel=3)
                shutil.rmtree(ckpt, ignore_errors=True)
                restarted = True
                continue
            attempts += 1
            continue
        except Exception as err:  # one failing run must not cost the others
            error = f"{type(err).__name__}: {err}"
            attempts += 1
            continue
        row = {
            "setting": case if case is not None else setting, "method": label, "seed": seed, "scale": scale,
            "metric": result.metric_name, "val": result.val_metric, "test": result.test_metric, "best_step": result.best_step,
            "seconds": result.timings["total_s"], "data": result.config.get("data_source"), "status": "ok", "error": "",
            "kept": (result.config.get("selection") or {}).get("kept", ""),
        }
        if keep_result:
            row["_result"] = result
        return row
    return {"setting": case if case is not None else setting, "method": label, "seed": seed, "scale": scale, "metric": None, "val": math.nan, "test": math.nan,
            "best_step": None, "seconds": math.nan, "data": None, "status": "failed",
            "error": f"{error} (after {attempts} attempt{'s' if attempts > 1 else ''})", "kept": ""}


def sweep(
    settings: str | Iterable[str] | Mapping[str, str | tuple[str, Mapping[str, Any]]],
    methods: MethodSpec | Iterable[MethodSpec],
    seeds: int | Iterable[int] = (0, 1, 2),
    scale: str | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    executor: str | Any = "local",
    jobs: int | None = None,
    runs_per_gpu: int = 1,
    out: str | os.PathLike | None = None,
    retries: int = 0,
    divergence: tuple[float, int] | None = (10.0, 2),
    guard: str | None = None,
    guard_margin: float | None = None,
    guard_drop: float | str | None = None,
    return_runs: bool = False,
    **overrides: Any,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[tuple[str, str, int], RunResult]]:
    """Run every (setting, method, seed); returns a tidy table with one row per run.

    `settings` is a name, a list of names, or a mapping of labelled cases with their own
    overrides, ``{label: (name, overrides)}`` (`setting_cases`): ``{"noise 0.2": ("fashion-rotation",
    {"label_noise": 0.2}), ...}`` runs one setting at several noise rates; the table's ``setting``
    column is the label. A case's overrides and the sweep's `overrides` are applied together (a key
    in both is refused: say it in one place).

    `methods` takes what `run` takes: names (``"maoal"``), configured methods (``MAOAL(lower_steps=5)``),
    a name with keyword arguments (``("maoal", {"lower_steps": 5})``: on top of the setting's
    defaults for the scale, as ``run(..., method_kwargs=...)``), or a labelled method
    (``("maoal-fast", MAOAL(lower_steps=5))``); the table's ``method`` column is the label
    (`method_entries`). A configured method is copied for every run.

    Everything that can be checked is checked before the first run: settings, methods,
    overrides, duplicate seeds / methods / settings (refused), and the output paths.

    Args:
        out_dir: one CSV per finished run, written atomically; runs whose file exists are read
            back instead of re-run (an empty, header-only or otherwise unreadable file is named in
            a `SweepWarning` and re-run), and a run in progress checkpoints next to its file, so
            an interrupted sweep resumes where it stopped, inside a run too. The file name
            carries the scale, the overrides and the data root: another protocol never reuses a result.
        out: the combined table (CSV), rewritten atomically after each finished run.
        retries: a run that raises is tried again this many times; then it becomes a row with
            ``status="failed"`` and its ``error``, and the sweep goes on with the other runs.
        divergence: the Trainer's divergence guard ``(k, n)`` (on by default here: a run whose
            training loss explodes fails with the step and task named instead of passing as a
            result); ``None`` turns it off.
        guard, guard_margin, guard_drop: the do-no-harm guard of every run (see `run`). Default
            ``None``, unlike `run`'s ``"auto"``: a sweep measures methods, so each row is the method
            alone; with ``"auto"`` (or another guard) a row is the guarded run, its ``kept`` column
            says which candidate it kept, and it reuses the sweep's own STL and Equal rows of its
            setting and seed when they are exactly its candidates (the local executor).

        return_runs: also return every run's `RunResult` (learning curves, learned weights, the
            data it used) as ``(table, runs)``, ``runs[setting, method, seed]`` keyed like the
            table's rows (failed runs are absent). The local executor only, and without
            `out_dir` (a run read back from its file has its row, not its result).

    Use `summarize` for mean ± std over seeds (failed rows are left out).

    `executor` says where the runs execute (`auxnb.experiments.executors`): ``"local"`` (one
    after another, here), ``"processes"`` (`jobs` at once on this machine, `runs_per_gpu` per
    GPU) or ``"ray"`` (Ray tasks; ``$RAY_ADDRESS`` or a local instance), or an `Executor`.
    Every executor writes the same files and gives the same numbers for the same seeds; the
    table is in (setting, method, seed) order whatever order the runs finish in. Per-run
    progress bars are shown by the ``local`` executor only.
    """
    from .executors import get_executor

    import shutil
    import warnings

    cases = setting_cases(settings)
    settings = _unique("settings", [label for label, _, _ in cases])
    case_of = {label: (name, own) for label, name, own in cases}
    for label, (name, own) in case_of.items():
        both = sorted(set(own) & set(overrides))
        if both:
            raise ValueError(f"Override(s) {both} given both for case {label!r} and for the whole sweep; give each in one place.")
    entries = method_entries(methods)
    seeds = _unique("seeds", list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds])
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}.")
    scale = scale or default_scale()
    for s in settings:
        resolve_config(case_of[s][0], scale, {**case_of[s][1], **overrides})
    names = {label: _method_of(spec)[0] for label, spec in entries}  # every entry built once: bad kwargs fail here
    specs = dict(entries)
    if not (isinstance(guard, str) and guard == "auto"):
        resolve_guard(guard, "stl")  # a bad guard is an error before the first run
    if guard_margin is not None:
        from ..selection import check_margin

        check_margin(guard_margin)
    if guard_drop is not None and not (guard_drop == "auto" or (isinstance(guard_drop, (int, float))
                                                                and not isinstance(guard_drop, bool) and guard_drop >= 0)):
        raise ValueError(f"guard_drop must be None, 'auto' or a number >= 0, got {guard_drop!r}.")
    for s in settings:  # every refused pair is reported before the first run starts
        for label in specs:
            check_applicable(case_of[s][0], names[label])
    ex = get_executor(executor, jobs=jobs, runs_per_gpu=runs_per_gpu)
    if return_runs and (ex.name != "local" or out_dir is not None):
        raise ValueError("return_runs=True keeps every run's result in this process: it needs executor='local' and no "
                         f"out_dir (got executor={ex.name!r}, out_dir={out_dir!r}); drop return_runs, or out_dir/executor.")
    table_path, runs_dir = check_sweep_outputs(out, out_dir)
    keys = [(s, m, seed) for s in settings for m in specs for seed in seeds]
    run_overrides = {s: {**case_of[s][1], **overrides} for s in settings}
    paths = [_run_file(runs_dir, s, m, seed, scale, run_overrides[s], data_root, guard, guard_margin, _spec_key(specs[m]),
                       guard_drop, setting_name=case_of[s][0])
             if runs_dir is not None else None for s, m, seed in keys]
    rows: list[dict[str, Any] | None] = [None] * len(keys)
    for i, path in enumerate(paths):
        if path is not None and path.exists():
            rows[i], why = read_run_file(path, *keys[i])
            if rows[i] is None:
                warnings.warn(f"Per-run file {path} is {why}; re-running that run.", SweepWarning, stacklevel=2)
    todo = [i for i in range(len(keys)) if rows[i] is None]
    shared = None
    if ex.name == "local" and {"stl", "equal"} & set(specs):
        # a guarded run reuses its setting and seed's STL and Equal rows (exactly the same runs):
        # each setting and seed's rows run together, STL and Equal first (the table keeps its order)
        first = {"stl": 0, "equal": 1}
        todo.sort(key=lambda i: (settings.index(keys[i][0]), seeds.index(keys[i][2]), first.get(keys[i][1], 2)))
        shared = {}
    dev = str(device) if isinstance(device, torch.device) else device
    show = progress and ex.name == "local"

    runs: dict[tuple[str, str, int], RunResult] = {}

    def finished(j: int, row: dict[str, Any]) -> None:
        i = todo[j]
        result = row.pop("_result", None)
        if result is not None:
            runs[keys[i]] = result
        rows[i] = row
        path = paths[i]
        if row["status"] != "ok":
            warnings.warn(f"Run {keys[i]} failed: {row['error']}; the sweep goes on", SweepWarning, stacklevel=2)
        elif path is not None:
            from ..checkpoint import write_csv  # writer-unique temporary name, "Disk full" on ENOSPC (issue 26)

            write_csv(path, pd.DataFrame([row], columns=list(SWEEP_COLUMNS)))
            shutil.rmtree(_checkpoint_dir(path), ignore_errors=True)  # the row is safe; its checkpoint is not needed
        if table_path is not None:  # the combined table after each finished run, atomically
            write_table(table_path, [r for r in rows if r is not None])

    jobs_ = [(case_of[keys[i][0]][0], specs[keys[i][1]], keys[i][2], scale, data_root, dev, show, dict(run_overrides[keys[i][0]]),
              None if paths[i] is None else str(paths[i]), retries, divergence, guard, guard_margin, keys[i][1], shared,
              guard_drop, keys[i][0], return_runs) for i in todo]

    def died(j: int, job: tuple, cause: str) -> dict[str, Any]:  # a worker process died (issue 26): a failed row
        return {**dict.fromkeys(SWEEP_COLUMNS), "setting": job[16], "method": job[13], "seed": job[2], "scale": job[3],
                "val": math.nan, "test": math.nan, "seconds": math.nan, "status": "failed", "error": f"WorkerDied: {cause}", "kept": ""}

    takes = __import__("inspect").signature(ex.map).parameters  # an Executor of the user's may lack the keywords
    ex.map(_sweep_row, jobs_, on_result=finished, **({"retries": retries, "on_death": died} if "on_death" in takes else {}))
    if table_path is not None and not todo:
        write_table(table_path, rows)
    table = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    return (table, {key: runs[key] for key in keys if key in runs}) if return_runs else table  # runs in the table's order


def summarize(table: pd.DataFrame, value: str = "test", digits: int = 2, percent: bool = True) -> pd.DataFrame:
    """Mean ± std (sample std, ddof=1) over seeds for each (setting, method).

    Returns columns ``mean``, ``std``, ``n`` and a formatted ``mean ± std`` string; accuracy-like
    values are shown in percent when `percent` is true.
    """
    if "status" in table:
        table = table[table["status"].fillna("ok") == "ok"]
    grouped = table.groupby(["setting", "method"], sort=False)[value]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    scale = 100.0 if percent else 1.0
    out["mean ± std"] = [
        f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if not math.isnan(m) else "nan" for m, s in zip(out["mean"], out["std"])
    ]
    return out


_LOWER_IS_BETTER = {"rmse", "mae", "logloss", "bce"}


def summary_table(table: pd.DataFrame, value: str = "test", digits: int | None = None) -> pd.DataFrame:
    """Mean ± std over seeds in the papers' layout: one row per method, one column per setting.

    Accuracy is shown in percent with 2 decimals, RMSE-like metrics (``metric`` column of the
    sweep table) as they are with 4 decimals (MAOAL Table 1's formats), or `digits` decimals.
    The std is the sample std (ddof=1; 0 for a single seed). Methods and settings keep the order
    in which they first appear.

    Example:
        >>> t = pd.DataFrame({"setting": ["s"] * 2, "method": ["stl"] * 2, "metric": ["accuracy"] * 2,
        ...                   "test": [0.50, 0.52]})
        >>> summary_table(t).loc["stl", "s"]
        '51.00 ± 1.41'
    """
    if "status" in table:
        table = table[table["status"].fillna("ok") == "ok"]
    metrics = table["metric"] if "metric" in table else pd.Series("accuracy", index=table.index)
    cells: dict[tuple[str, str], str] = {}
    for (setting, method), group in table.groupby(["setting", "method"], sort=False):
        metric_name = str(metrics.loc[group.index[0]])
        values = group[value].astype(float)
        mean, std = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
        scale, places = (1.0, 4) if metric_name in _LOWER_IS_BETTER else (100.0, 2)
        places = places if digits is None else digits
        cells[(method, setting)] = "nan" if math.isnan(mean) else f"{mean * scale:.{places}f} ± {std * scale:.{places}f}"
    methods = list(dict.fromkeys(table["method"]))
    settings_ = list(dict.fromkeys(table["setting"]))
    out = pd.DataFrame([[cells.get((m, s), "") for s in settings_] for m in methods], index=methods, columns=settings_)
    out.index.name = "method"
    return out
