"""Fault injection: a real training process killed with SIGKILL resumes bit-identically, for every method.

For every registered method, a run on a small digits setting is killed twice at points drawn from
a seeded generator — inside a lower step, then inside an upper step (bi-level methods) or while a
checkpoint is being written (the others) — and resumed each time; its final metrics, best step,
history (all but wall-clock seconds), trace and, for HPO-tune, every trial's result must equal an
uninterrupted run's exactly, and the last process must have trained only the steps after the
last checkpoint. The same for a sweep killed between runs and during a run.

The children are forked from a forkserver that has imported auxnb once, so each costs no import.
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fault_child  # noqa: E402

from auxnb import experiments, methods  # noqa: E402
from auxnb.selection import resolve_guard  # noqa: E402

TOTAL, EVERY = fault_child.RUN["steps"], fault_child.RUN["eval_every"]
LOWER_STEPS = fault_child.BILEVEL_KWARGS["lower_steps"]
TRIALS = fault_child.METHOD_KWARGS["hpo-tune"]["trials"]


@pytest.fixture(scope="module")
def ctx():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["auxnb.experiments", "fault_child"])
    return context


def report(name: str, started: float, cpu_file: Path, children: int) -> None:
    """With ``$AUXNB_FAULT_REPORT`` set, append what this test cost (for the closing note's table)."""
    import json
    import os

    path = os.environ.get("AUXNB_FAULT_REPORT")
    if not path:
        return
    cpu = sum(float(line) for line in cpu_file.read_text().split()) if cpu_file.exists() else float("nan")
    with open(path, "a") as fh:
        fh.write(json.dumps({"test": name, "wall_s": round(time.perf_counter() - started, 2), "children": children,
                             "children_cpu_s": round(cpu, 2), "parent_cpu_s": round(time.process_time() - CPU0[name], 2)}) + "\n")


CPU0: dict[str, float] = {}


def child(ctx, target, *args, timeout: float = 600) -> tuple[int, float]:
    t0 = time.perf_counter()
    proc = ctx.Process(target=target, args=args)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        pytest.fail(f"child {target.__name__}{args} did not finish in {timeout} s")
    return proc.exitcode, time.perf_counter() - t0


def same(a, b) -> bool:
    """Exact equality, NaN equal to NaN, numpy arrays element- and dtype-wise, DataFrames cell-wise."""
    if isinstance(a, pd.DataFrame):
        return isinstance(b, pd.DataFrame) and list(a.columns) == list(b.columns) and a.equals(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def differences(a: dict, b: dict) -> list[str]:
    return [k for k in a if k not in ("total_s", "lower_calls") and not same(a[k], b.get(k))]


def checkpoint_after_kill(start: int, kill: dict, lower_steps: int | None) -> int:
    """The step of the last checkpoint on disk after `kill` in a process that resumed at `start`."""
    n = kill["n"]
    if kill["at"] == "lower":  # died inside lower step start + n: steps up to start + n - 1 done
        return (start + n - 1) // EVERY * EVERY
    if kill["at"] == "upper":  # died in the upper step after lower step s, before the evaluation at s
        s = (start // lower_steps + n) * lower_steps
        return (s - 1) // EVERY * EVERY
    return start + (n - 1) * EVERY  # "save": the n-th new checkpoint never landed


def plan(name: str, bilevel: bool) -> list[tuple[dict, int]]:
    """Two kills drawn from a generator seeded by the method's name, with the step each resumes from."""
    rng = random.Random(f"auxnb-faults:{name}")
    # HPO-tune: the first kill falls in the second trial (the search must resume inside it)
    offset = TOTAL if name == "hpo-tune" else 0
    # after the first checkpoint (step 3), so that every method resumes from a real mid-run checkpoint;
    # a kill before any checkpoint (resume="auto" starts afresh) is tested in test_checkpoint.py
    first = {"at": "lower", "n": offset + rng.randint(EVERY + 1, TOTAL - 2)}
    start = checkpoint_after_kill(0, {"at": "lower", "n": first["n"] - offset}, None)
    if bilevel:
        remaining_upper = TOTAL // LOWER_STEPS - start // LOWER_STEPS
        second = {"at": "upper", "n": rng.randint(1, remaining_upper)}
    else:
        second = {"at": "save", "n": rng.randint(1, (TOTAL - start) // EVERY)}
    end = checkpoint_after_kill(start, second, LOWER_STEPS if bilevel else None)
    return [(first, start), (second, end)]


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.names())
def test_a_run_killed_twice_with_sigkill_resumes_bit_identically(ctx, tmp_path, name):
    from auxnb.methods import bilevel

    if name == "aggregator":  # an optional extra: pip install "auxnb[aggregators]"
        pytest.importorskip("torchjd")
    started, CPU0[name] = time.perf_counter(), time.process_time()
    is_bilevel = isinstance(methods.get(name), bilevel.BilevelMethod)
    reference = fault_child.result_record(experiments.run(
        "digits-rotation", name, seed=0, progress=False, device="cpu", method_kwargs=fault_child.method_kwargs(name),
        **fault_child.RUN,
    ))
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out.pkl")
    kills = plan(name, is_bilevel)
    for kill, _ in kills:
        code, _ = child(ctx, fault_child.train, name, 0, ckpt, kill, out)
        assert code == -signal.SIGKILL, f"{name}: the child was to die at {kill} but exited with {code}"
        assert not Path(out).exists()
    code, _ = child(ctx, fault_child.train, name, 0, ckpt, None, out)
    assert code == 0
    with open(out, "rb") as fh:
        resumed = pickle.load(fh)
    assert differences(reference, resumed) == [], f"{name} after kills {kills}"
    # the last process trained only what came after the last checkpoint (HPO-tune: in the second trial),
    # then, for a method that `run` guards by default, its STL and Equal candidates whole
    fallbacks = {None: 0, "stl": 1, "stl+equal": 2}[resolve_guard("auto", name)]  # run's default guard (issue 23)
    assert resumed["lower_calls"] == TOTAL - kills[-1][1] + fallbacks * TOTAL, (name, kills, resumed["lower_calls"])
    if name == "hpo-tune":
        assert len(resumed["trace_trials"]) == TRIALS
    report(name, started, Path(out + ".cpu"), 3)


@pytest.mark.slow
@pytest.mark.parametrize("candidate", [1, 2], ids=["in-stl", "in-equal"])
def test_a_guarded_run_killed_inside_a_later_candidate_resumes_bit_identically(ctx, tmp_path, candidate):
    """`run` guards JTDS by default (issue 23): the candidates train in turn (jtds, stl, equal), each
    in its own checkpoint folder; a SIGKILL inside STL's or Equal's run resumes that candidate from its
    own last checkpoint, the finished ones from theirs, and the kept run and every candidate are the
    uninterrupted ones, bit for bit."""
    name = "jtds"
    assert resolve_guard("auto", name) == "stl+equal"
    started, CPU0[f"guard-{candidate}"] = time.perf_counter(), time.process_time()
    reference = fault_child.result_record(experiments.run(
        "digits-rotation", name, seed=0, progress=False, device="cpu", method_kwargs=fault_child.method_kwargs(name),
        **fault_child.RUN,
    ))
    assert list(reference["candidates"]) == ["jtds", "stl", "equal"]
    rng = random.Random(f"auxnb-faults:guard:{candidate}")
    inside = rng.randint(EVERY + 1, TOTAL - 2)  # after the candidate's first checkpoint
    kill = {"at": "lower", "n": candidate * TOTAL + inside}
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out.pkl")
    code, _ = child(ctx, fault_child.train, name, 0, ckpt, kill, out)
    assert code == -signal.SIGKILL and not Path(out).exists()
    code, _ = child(ctx, fault_child.train, name, 0, ckpt, None, out)
    assert code == 0
    with open(out, "rb") as fh:
        resumed = pickle.load(fh)
    assert differences(reference, resumed) == [], f"{name} after kill {kill}"
    # the finished candidates were not trained again; the killed one from its last checkpoint on
    start = checkpoint_after_kill(0, {"at": "lower", "n": inside}, None)
    assert resumed["lower_calls"] == TOTAL - start + (2 - candidate) * TOTAL, (kill, resumed["lower_calls"])
    report(f"guard-{candidate}", started, Path(out + ".cpu"), 2)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [{"at": "run", "n": 3}, {"at": "lower", "n": TOTAL + 5}], ids=["between-runs", "during-a-run"])
def test_a_sweep_killed_with_sigkill_resumes_to_the_same_table(ctx, tmp_path, kill):
    spec = fault_child.SWEEP
    started, CPU0[f"sweep-{kill['at']}"] = time.perf_counter(), time.process_time()
    reference = experiments.sweep(spec["settings"], spec["methods"], spec["seeds"], device="cpu", progress=False, **fault_child.RUN)
    runs, table, out = str(tmp_path / "runs"), str(tmp_path / "table.csv"), str(tmp_path / "out.pkl")
    code, _ = child(ctx, fault_child.sweep, runs, table, kill, out)
    assert code == -signal.SIGKILL
    # the combined table on disk holds exactly the runs finished before the kill
    finished = 2 if kill["at"] == "run" else 1
    assert len(pd.read_csv(table)) == finished
    code, _ = child(ctx, fault_child.sweep, runs, table, None, out)
    assert code == 0
    with open(out, "rb") as fh:
        saved = pickle.load(fh)
    resumed = saved["table"]
    # finished runs were read back, and a run killed mid-way resumed from its checkpoint (step 3)
    runs = len(spec["methods"]) * len(spec["seeds"])
    expected_calls = (runs - 2) * TOTAL if kill["at"] == "run" else (runs - 1) * TOTAL - 3
    assert saved["lower_calls"] == expected_calls
    cols = [c for c in reference.columns if c != "seconds"]
    assert resumed[cols].equals(reference[cols])
    on_disk = pd.read_csv(table)
    assert on_disk[cols].equals(pd.read_csv(_csv(reference))[cols])
    report(f"sweep-{kill['at']}", started, Path(out + ".cpu"), 2)


def _csv(frame: pd.DataFrame):
    import io

    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    buf.seek(0)
    return buf
