"""Choosing among runs, above the Trainer: the do-no-harm guard and HPO-tune's search.

A `Trainer` trains exactly one run. Selection trains several *candidates* — each a whole run of
its own through the Trainer, from the same initial weights and seed — and keeps one on D_val
(the split every run already selects its checkpoint on); D_test is read by each candidate once,
never used to choose.

* **The do-no-harm guard** (``guard="stl"`` or ``"stl+equal"``): candidates are the method, STL
  and (``"stl+equal"``) Equal on the method's own auxiliary tasks and extra losses. It keeps the
  simplest run that no more complex run beats on D_val by more than ``margin`` (`select`: STL,
  then Equal, then the method): a gap within D_val's noise goes to the simpler run.
* **A search** (a method with ``search_runs(tasks)``, HPO-tune): candidates are its trials; the
  best D_val wins (ties: the first trial).
* **A ranking** (ForkMerge's pruning stage, ``ForkMerge(topk=...)``): one short run per auxiliary
  task (the primary task with it, stopped after ``prune_steps`` on the whole run's schedule) ranks
  the tasks on D_val; the run kept is the ForkMerge run with the top-k branches that ranking gives.

The kept candidate's `RunResult` comes back with ``candidates`` (every candidate's own result:
its φ, history, trace) and ``config["selection"]`` (kind, what was kept, every candidate's D_val,
the margin); `describe` turns that into one line, e.g.
``kept stl: val 0.9310 (maoal 0.9120, equal 0.9250; margin 0.01)``.

Cheaper: a finished run that is exactly a candidate's (the same identity: method and configuration,
seed, trainer knobs, run config, split ids) is taken instead of training it (``reuse=``; `sweep`
hands a guarded run its own STL and Equal rows), and ``guard_drop`` trains the candidates in
lockstep, evaluated on D_val at the same steps, stopping one that trails the leader by more than
`drop_bound` in the second half of the run (`benchmarks/guard_cost.py` measures both).

Checkpoints: each candidate checkpoints in ``<checkpoint_dir>/<candidate>/`` with its own identity
plus the selection's; the selection's own state (identity, each candidate's status and D_val)
is ``<checkpoint_dir>/selection.pt``. A resumed selection is checked against it before any
candidate is touched, and a folder holding another kind of run (a single run's ``checkpoint.pt``,
another guard or search) is refused with what differs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

from . import checkpoint as ckpt_io
from ._deprecation import warn_once
from .methods.base import Method
from .methods.guard import equal_fallback, select
from .methods.stl import STL
from .results import RunResult

__all__ = [
    "GUARDS", "GUARD_CHOICES", "DEFAULT_MARGIN", "GUARDED_BY_DEFAULT", "check_guard", "check_margin", "resolve_guard",
    "guard_candidates", "is_search", "is_ranking", "needs_selection", "select", "fit_selection", "describe", "STATE_FILE",
    "warn_once",
]

#: What the guard may be: ``None`` (off: the method alone), ``"stl"`` (also STL) or ``"stl+equal"``
#: (also STL and Equal on the method's auxiliary tasks and extra losses).
GUARDS = ("stl+equal", "stl", None)
#: The CLI's spelling (``--guard none`` is ``guard=None``).
GUARD_CHOICES = ("stl+equal", "stl", "none")
#: The default margin, in the D_val metric's units (0.01 = one point of accuracy; chosen on seeds 0-4
#: of benchmarks/no_harm.py, ``--margins``).
DEFAULT_MARGIN = 0.01
#: Methods that `experiments.run` (and the CLI) guard when ``guard="auto"`` (their default): the
#: bi-level methods whose learned weights can end below STL or Equal on real data
#: (``benchmarks/results/no_harm*.csv``: alone, they lose on most real cases beyond digits rotation).
GUARDED_BY_DEFAULT = ("maoal", "jtds", "dtg")
#: The selection's own state file inside ``checkpoint_dir``.
STATE_FILE = "selection.pt"


def check_guard(guard: Any) -> str | None:
    """`guard` itself (``"none"`` read as None), or a ValueError naming the valid values."""
    if isinstance(guard, str) and guard.strip().lower() == "none":
        return None
    if guard not in GUARDS:
        raise ValueError(f"guard must be None (off), 'stl' or 'stl+equal', got {guard!r}.")
    return guard


def check_margin(margin: Any, name: str = "guard_margin") -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"{name} must be a finite number >= 0 in the D_val metric's units "
                         f"(0.005 = half a point of accuracy), got {margin!r}.")
    return float(margin)


def resolve_guard(guard: Any, method: Method | str) -> str | None:
    """The guard a run gets: ``"auto"`` is ``"stl+equal"`` for the methods in `GUARDED_BY_DEFAULT`
    and None (the method alone) for every other method; anything else is checked (`check_guard`).

    Example:
        >>> resolve_guard("auto", "maoal"), resolve_guard("auto", "gcs"), resolve_guard("stl", "gcs")
        ('stl+equal', None, 'stl')
    """
    if isinstance(guard, str) and guard == "auto":
        name = method if isinstance(method, str) else method.name
        return "stl+equal" if name in GUARDED_BY_DEFAULT else None
    return check_guard(guard)


def is_search(method: Method) -> bool:
    """Whether `method` is a search over runs (it has ``search_runs(tasks)``, e.g. HPO-tune)."""
    return callable(getattr(method, "search_runs", None))


def is_ranking(method: Method) -> bool:
    """Whether `method` ranks its auxiliary tasks in runs of their own before it trains (ForkMerge's
    pruning stage, ``ForkMerge(topk=...)``: it has ``ranking_runs`` and a `topk`)."""
    return callable(getattr(method, "ranking_runs", None)) and getattr(method, "topk", None) is not None


def needs_selection(method: Method, guard: str | None) -> bool:
    return guard is not None or is_search(method) or is_ranking(method)


def guard_candidates(method: Method, guard: str) -> dict[str, Method]:
    """The guard's candidates in the order they train: `method`, STL, then (``"stl+equal"``) Equal on
    `method`'s own auxiliary tasks and extra losses (weight 1). A method that *is* one of them (STL,
    Equal) stands for it and is not trained twice. `select` reads them simplest first (`simplest_first`)."""
    runs: dict[str, Method] = {method.name: method}
    runs.setdefault("stl", STL())
    if guard == "stl+equal":
        runs.setdefault("equal", equal_fallback(method))
    return runs


def simplest_first(names: list[str]) -> list[str]:
    """The guard's candidates in the order `select` reads them: STL, Equal, then the method."""
    return [n for n in ("stl", "equal") if n in names] + [n for n in names if n not in ("stl", "equal")]


# ----------------------------------------------------------------------------- fitting
def fit_selection(trainer: Any, guard: str | None, margin: float) -> RunResult:
    """Train `trainer`'s candidates (one run each, through the Trainer) and keep one on D_val.

    `trainer` is a `auxnb.Trainer` whose ``fit()`` delegated here (``Trainer(..., guard=...)`` or a
    search method); its model ends with the kept run's best-on-val weights, in eval mode.
    """
    method = trainer.method
    if is_ranking(method):
        return _fit_ranking(trainer, guard)
    method.setup(trainer.model, trainer._setup_info())  # a search reads the tasks off its method
    if is_search(method):
        kind, trials = "search", method.search_runs(trainer.tasks)
        runs = {key: m for key, (m, _) in trials.items()}
        info = {key: dict(described) for key, (_, described) in trials.items()}
        guard = None
    else:
        kind, runs, info = "guard", guard_candidates(method, guard), {}
    identity = {
        "kind": kind, "guard": guard, "margin": margin if kind == "guard" else None, "candidates": list(runs),
        "run": trainer._identity(method),
    }
    state = _State(trainer.checkpoint_dir, trainer.resume, identity)
    initial = copy.deepcopy(trainer.model.state_dict())
    results: dict[str, RunResult] = {}
    reused, subs = [], {}
    for key, candidate in runs.items():
        sub = _candidate_trainer(trainer, candidate, key, initial, identity)
        if kind == "guard" and key != method.name and _same_run(sub, candidate, getattr(trainer, "reuse", {}).get(key)):
            results[key] = trainer.reuse[key]  # exactly this candidate's run, already trained (a sweep's row)
            reused.append(key)
            state.done(key, results[key], status="reused")
        else:
            subs[key] = (sub, candidate)
    drop = getattr(trainer, "guard_drop", None) if kind == "guard" else None
    if drop is None or len(subs) < 2:
        for key, (sub, candidate) in subs.items():
            state.running(key)
            results[key] = sub._fit_one()
            state.done(key, results[key])
    else:
        results.update(_lockstep(subs, state, drop, margin, trainer))
    higher = trainer.tasks.primary.higher_is_better
    vals = {key: float(r.val_metric) for key, r in results.items()}
    if kind == "guard":
        order = simplest_first(list(runs))
        kept_key = select(vals[order[-1]], {k: vals[k] for k in order[:-1]}, higher_is_better=higher, margin=margin,
                          method_name=order[-1]) if len(order) > 1 else order[0]
    else:
        sign = 1.0 if higher else -1.0
        kept_key = max(vals, key=lambda k: -math.inf if math.isnan(vals[k]) else sign * vals[k])
    kept = results[kept_key]
    selection = {"kind": kind, "guard": guard, "margin": margin if kind == "guard" else None, "method": method.name,
                 "kept": kept_key, "val": vals, "metric": kept.metric_name, "reused": reused,
                 "dropped": {k: r["step"] for k, r in state.runs.items() if r.get("status") == "dropped"}}
    config = {**kept.config, "selection": selection}
    extra: dict[str, Any] = {}
    if kind == "guard":
        own = results[method.name]
        fallbacks = [k for k in simplest_first(list(results)) if k != method.name]
        # the record the earlier (issue 13) guard wrote, read by plots and tables
        config["fallback"] = {"fallback": guard, "margin": margin, "method": method.name,
                              "kept": kept_key, "val_method": vals[method.name], "val_fallback": vals[fallbacks[0]] if fallbacks else vals[method.name],
                              **({"val_equal": vals["equal"]} if "equal" in vals else {})}
        extra["trace_trials"] = list(own.trace) if kept is not own else kept.trace_trials
    else:
        extra["trace_trials"] = [{**info[k], "val_metric": r.val_metric} for k, r in results.items()]
        config.update(method.search_config(info[kept_key]) if hasattr(method, "search_config") else {})
    # what this result cost: the candidates it trained (a reused run was paid for by its own row)
    seconds = sum(float(r.timings["total_s"]) for k, r in results.items() if k not in reused)
    timings = {**kept.timings, "run_total_s": kept.timings["total_s"], "total_s": seconds, "fits": len(results) - len(reused)}
    return _keep(trainer, state, kept_key, kept, results, selection, config, timings, **extra)


def _keep(trainer: Any, state: "_State", kept_key: str, kept: RunResult, results: Mapping[str, RunResult],
          selection: dict[str, Any], config: dict[str, Any], timings: dict[str, Any], **extra: Any) -> RunResult:
    """The selection's result: `trainer`'s model takes the kept run's best-on-val weights (eval mode), the
    state records what was kept, the callbacks hear ``"selection"``."""
    trainer.model.load_state_dict(kept.weights)
    trainer.model.eval()
    trainer.model._auxnb_fitted = kept.config.get("method")
    state.finish(kept_key)
    out = dataclasses.replace(kept, config=config, timings=timings, candidates=dict(results), model=trainer.model, **extra)
    for cb in trainer.callbacks:
        cb("selection", dict(selection))
    return out


def _fit_ranking(trainer: Any, guard: str | None) -> RunResult:
    """ForkMerge's pruning stage (``ForkMerge(topk=...)``): one short ranking run per auxiliary task
    (`ForkMerge.ranking_runs`, each stopped after `prune_steps` lower steps on the whole run's schedule),
    the tasks ranked by those runs' best D_val metric, then the ForkMerge run with the branches the
    ranking gives (`ForkMerge.from_ranking`). Every run starts from the same initial weights and seed;
    each checkpoints in ``<checkpoint_dir>/<key>/``, and a resumed stage takes each up from its own
    checkpoint (a finished run is read back, not trained again)."""
    method = trainer.method
    if guard is not None:
        raise ValueError(
            "ForkMerge(topk=...) ranks its auxiliary tasks in runs of their own before it trains, and the do-no-harm "
            f"guard does not wrap that stage: pass guard=None (CLI: --guard none), or give the branches yourself "
            f"(branches=[...]) to guard it; got guard={guard!r}.")
    total = trainer._run_length(len(trainer.data.for_run(method).train))
    method.setup(trainer.model, trainer._setup_info(total_steps=total))  # refuses a bad topk / prune_steps here
    prune = method.prune_steps_for(total)
    runs = method.ranking_runs(trainer.tasks)
    final_key = method.name
    identity = {"kind": "ranking", "guard": None, "margin": None, "candidates": [*runs, final_key],
                "run": trainer._identity(method)}
    state = _State(trainer.checkpoint_dir, trainer.resume, identity)
    initial = copy.deepcopy(trainer.model.state_dict())
    results: dict[str, RunResult] = {}
    for key, candidate in runs.items():
        sub = _candidate_trainer(trainer, candidate, key, initial, identity)
        state.running(key)
        results[key] = sub._fit_one(stop_at=prune)
        state.done(key, results[key])
    from .methods.forkmerge import rank_tasks

    scores = {key[len("rank-"):]: float(r.val_metric) for key, r in results.items()}
    ranking = rank_tasks(scores, trainer.tasks.primary.higher_is_better)
    final = method.from_ranking(ranking)
    sub = _candidate_trainer(trainer, final, final_key, initial, identity)
    state.running(final_key)
    kept = sub._fit_one()
    state.done(final_key, kept)
    results[final_key] = kept
    vals = {key: float(r.val_metric) for key, r in results.items()}
    selection = {"kind": "ranking", "guard": None, "margin": None, "method": method.name, "kept": final_key,
                 "val": vals, "metric": kept.metric_name, "reused": [], "dropped": {}, "ranking": ranking,
                 "prune_steps": prune, "branches": ckpt_io.describe_value(final.branches)}
    config = {**kept.config, "selection": selection}
    seconds = sum(float(r.timings["total_s"]) for r in results.values())
    timings = {**kept.timings, "run_total_s": kept.timings["total_s"], "total_s": seconds, "fits": len(results)}
    return _keep(trainer, state, final_key, kept, results, selection, config, timings)


#: A candidate is dropped only at evaluations in the second half of the run: before that, a run
#: that learns auxiliary weights (or warms up its φ) often trails and catches up.
DROP_AFTER = 0.5


def drop_bound(drop: float | str, margin: float, leader: float, n_val: int, metric: str) -> float:
    """How far behind the leader on D_val a candidate may fall before the guard stops training it.

    ``"auto"`` (accuracy only): ``margin + 2·√(2·p(1−p)/n_val)`` with p the leader's accuracy: the
    guard's margin plus two standard deviations of the difference of two runs' D_val accuracies
    under binomial sampling noise of n_val samples. A gap larger than that is not D_val noise, and
    a candidate that far behind in the second half of its run would, kept or not, not be chosen
    over the leader by the guard's rule unless it gains more than that gap afterwards. A number is
    the bound itself, in the metric's units.

    Example:
        >>> round(drop_bound("auto", 0.01, 0.9, 300, "accuracy"), 4)
        0.059
    """
    if not isinstance(drop, str):
        return float(drop)
    if metric != "accuracy":
        raise ValueError(f"guard_drop='auto' is defined for accuracy; give the bound in {metric} units (a number).")
    p = min(max(float(leader), 0.0), 1.0)
    return margin + 2.0 * math.sqrt(2.0 * p * (1.0 - p) / max(n_val, 1))


def _lockstep(subs: dict[str, tuple[Any, Method]], state: "_State", drop: float | str, margin: float,
              trainer: Any) -> dict[str, RunResult]:
    """Train the candidates in lockstep, evaluated on D_val at the same steps, stopping one whose best
    D_val so far trails the leader's by more than `drop_bound` at an evaluation in the second half of
    the run. With a bound of at least the guard's margin a stopped candidate is never the one kept:
    its final D_val is that best so far, and the leader's can only rise.

    Each candidate keeps its own process-wide random state (swapped in while it trains), so a
    candidate that is never dropped is bit-identical to its run trained alone. A dropped candidate
    keeps its best checkpoint so far (its D_val and D_test read as for any run).
    """
    from .checkpoint import capture_rng, restore_rng

    runs, gens, rngs, steps, finished, paused = {}, {}, {}, {}, set(), {}
    dropped = {k for k, r in state.runs.items() if r.get("status") == "dropped" and k in subs}
    for key, (sub, candidate) in subs.items():
        sub._check_resumable()
        runs[key] = sub._start(candidate)
        if key not in dropped:
            state.running(key)
            gens[key] = sub._steps(runs[key])
        rngs[key], steps[key], paused[key] = capture_rng(), runs[key].state["step"], runs[key].clock()
    metric = trainer.tasks.primary.metric
    sign = 1.0 if trainer.tasks.primary.higher_is_better else -1.0
    n_val, decided = len(trainer.data.val), 0

    def val_at(key: str, step: int) -> float:
        """The candidate's best D_val up to `step`: what selection would read if it stopped there (its
        best-on-val checkpoint), and what it can only improve on afterwards."""
        vals = [r[f"val_{metric}"] for r in runs[key].state["history"] if r["step"] <= step and not math.isnan(r[f"val_{metric}"])]
        return max(vals, key=lambda v: sign * v) if vals else math.nan

    while True:
        alive = [k for k in subs if k not in dropped and k not in finished]
        if not alive:
            break
        key = min(alive, key=lambda k: (steps[k], list(subs).index(k)))  # the one furthest behind trains next
        restore_rng(rngs[key])
        runs[key].t_start += runs[key].clock() - paused[key]  # a run's seconds are its own, not its neighbours'
        try:
            next(gens[key])
        except StopIteration:
            finished.add(key)
        rngs[key], steps[key], paused[key] = capture_rng(), runs[key].state["step"], runs[key].clock()
        alive = [k for k in subs if k not in dropped]
        level = min(steps[k] for k in alive)
        total = runs[key].total
        for step in sorted({r["step"] for k in alive for r in runs[k].state["history"] if decided < r["step"] <= level}):
            decided = step
            if step < DROP_AFTER * total or step >= total:
                continue
            vals = {k: val_at(k, step) for k in alive if k not in dropped}
            leader = max(vals, key=lambda k: -math.inf if math.isnan(vals[k]) else sign * vals[k])
            bound = drop_bound(drop, margin, vals[leader], n_val, metric)
            for k, v in vals.items():
                if k != leader and (math.isnan(v) or sign * (vals[leader] - v) > bound):
                    dropped.add(k)
                    state.drop(k, step)
                    gens[k].close()
    results = {}
    for key, (sub, _) in subs.items():
        runs[key].t_start += runs[key].clock() - paused[key]
        results[key] = sub._finish(runs[key])
        state.done(key, results[key], status="dropped" if key in dropped else "done")
        if key in dropped:
            state.runs[key]["step"] = steps[key]
    state._save(current=None)
    return results


def _same_run(sub: Any, candidate: Method, result: RunResult | None) -> bool:
    """Whether finished `result` is exactly the run `sub` would train for `candidate` (its identity:
    method and configuration, seed, trainer knobs, run config, split ids; the selection aside)."""
    if result is None or "identity" not in (result.config or {}) or result.weights is None:
        return False
    probe = copy.deepcopy(candidate)
    probe.setup(sub.model, sub._setup_info())  # identities are taken after set-up, as a run takes them
    mine = {k: v for k, v in sub._identity(probe).items() if k != "selection"}
    theirs = {k: v for k, v in result.config["identity"].items() if k != "selection"}
    return mine == theirs


def _candidate_trainer(trainer: Any, method: Method, key: str, initial: Mapping[str, Any], identity: dict) -> Any:
    """A copy of `trainer` that trains `method` alone, on its own model (the shared initial weights),
    checkpointing in ``<checkpoint_dir>/<key>/`` under its own identity and the selection's."""
    sub = copy.copy(trainer)
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(initial)
    sub.model, sub.method = model, method
    sub.guard, sub.guard_margin, sub.reuse = None, None, {}
    sub.checkpoint_dir = None if trainer.checkpoint_dir is None else Path(trainer.checkpoint_dir) / key
    # a candidate not reached yet has no checkpoint: it starts; one reached resumes from its own
    sub.resume = "auto" if trainer.resume else False
    sub.selection_identity = {k: identity[k] for k in ("kind", "guard", "margin", "candidates")} | {
        "method": identity["run"]["method"], "method_config": identity["run"]["method_config"], "candidate": key}
    return sub


#: how errors name each kind of selection
_KIND_WORDS = {"guard": "a guarded run", "search": "a search", "ranking": "a ForkMerge pruning stage"}


class _State:
    """``selection.pt``: the selection's identity and each candidate's status and D_val metric."""

    def __init__(self, directory: Path | None, resume: bool | str, identity: dict):
        self.path = None if directory is None else Path(directory) / STATE_FILE
        self.identity = identity
        self.runs: dict[str, dict[str, Any]] = {}
        if self.path is None:
            return
        if resume and self.path.exists():
            saved = ckpt_io.load(self.path)
            ckpt_io.check_identity(self.path, saved.get("identity"), identity)
            self.runs = dict(saved.get("runs", {}))
            return
        single = self.path.parent / "checkpoint.pt"
        if resume and single.exists():  # another kind of run's folder: say what differs
            saved = ckpt_io.load(single)
            theirs = saved.get("identity") or {}
            try:
                ckpt_io.check_identity(single, theirs, identity["run"] | {"selection": _short(identity)})
            except ckpt_io.CheckpointError as err:
                what = _KIND_WORDS[identity["kind"]]
                raise ckpt_io.CheckpointError(
                    f"{self.path.parent} holds the checkpoint of a single run of {theirs.get('method')!r} (no {STATE_FILE}), "
                    f"not that of {what} of {identity['run']['method']!r}: {err}") from None
        if resume is True:
            raise ckpt_io.CheckpointError(
                f"resume=True but there is no checkpoint of {_KIND_WORDS[identity['kind']]} in "
                f"{self.path.parent} (no {STATE_FILE}; a misspelled directory?); check the path, or pass resume='auto' "
                "(CLI: --resume --allow-fresh) to start from scratch when no checkpoint exists, or resume=False."
            )

    def running(self, key: str) -> None:
        self.runs.setdefault(key, {"status": "running"})
        self._save(current=key)

    def drop(self, key: str, step: int) -> None:
        self.runs[key] = {"status": "dropped", "step": int(step)}
        self._save(current=None)

    def done(self, key: str, result: RunResult, status: str = "done") -> None:
        self.runs[key] = {"status": status, "val_metric": float(result.val_metric), "best_step": int(result.best_step)}
        self._save(current=None)

    def finish(self, kept: str) -> None:
        self._save(current=None, kept=kept)

    def _save(self, **extra: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ckpt_io.save(self.path, {"identity": self.identity, "runs": self.runs, **extra})


def _short(identity: Mapping[str, Any]) -> dict[str, Any]:
    return {k: identity[k] for k in ("kind", "guard", "margin", "candidates")}


def check_single_run_folder(directory: Path | None, resume: bool | str, identity: Mapping[str, Any]) -> None:
    """A single run never resumes from (or writes into) a selection's folder: refused with what differs."""
    if directory is None or not resume:
        return
    path = Path(directory) / STATE_FILE
    if path.exists():
        saved = ckpt_io.load(path).get("identity") or {}
        theirs = {**(saved.get("run") or {}), "selection": _short(saved) if saved else None}
        ckpt_io.check_identity(path, theirs, {**identity, "selection": None})


def describe(result: RunResult, digits: int = 4) -> str | None:
    """One line saying which candidate a selected run kept and every candidate's D_val metric,
    e.g. ``kept stl: val 0.9310 (maoal 0.9120, equal 0.9250; margin 0.01)``; None for a single run."""
    info = (result.config or {}).get("selection")
    if not info:
        return None
    vals, kept = info["val"], info["kept"]
    if info.get("kind") == "ranking":  # ForkMerge's pruning stage: the ranking, then the run it built
        ranked = ", ".join(f"{t} {vals['rank-' + t]:.{digits}f}" for t in info["ranking"])
        return (f"{kept}: val {vals[kept]:.{digits}f}, its branches from ranking runs of {info['prune_steps']} steps "
                f"(val, best first: {ranked})")
    others = ", ".join(f"{k} {v:.{digits}f}" for k, v in vals.items() if k != kept)
    margin = f"; margin {info['margin']:g}" if info.get("margin") is not None else ""
    inner = f" ({others}{margin})" if others or margin else ""
    return f"kept {kept}: val {vals[kept]:.{digits}f}{inner}"
