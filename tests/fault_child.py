"""Child processes for the fault-injection tests (tests/test_faults.py); not a test module.

`train` and `sweep` run in a separate OS process (a forkserver child) and SIGKILL themselves at
a chosen point: inside the n-th lower step (after the forward, before the update), inside the
n-th upper step (after the hypergradient, before φ's optimiser steps), or while the n-th
checkpoint is being written (half the temporary file on disk). What they produce is written to
a file the parent compares with an uninterrupted run.
"""

from __future__ import annotations

import os
import pickle
import signal

import torch

from auxnb import experiments
from auxnb import checkpoint as ckpt_io
from auxnb import train as train_module
from auxnb.methods import bilevel

#: the small run every method is tried on: a few lower steps, an evaluation every 3
RUN = {"scale": "smoke", "steps": 12, "eval_every": 3, "batch_size": 32}
#: bi-level methods take an upper step every 2 lower steps here (and a tiny search for HPO-tune)
METHOD_KWARGS = {"hpo-tune": {"trials": 2},
                 # ForkMerge merges at steps 5 and 10: checkpoints (every 3) fall mid-interval, with branches in flight
                 "forkmerge": {"interval": 5},
                 # JTDS's default warm-up (40 lower steps without φ updates) would skip every upper step of 12
                 "jtds": {"lower_steps": 2, "warmup": 0}}
BILEVEL_KWARGS = {"lower_steps": 2}


def method_kwargs(name: str) -> dict:
    from auxnb.methods import get

    if name in METHOD_KWARGS:
        return dict(METHOD_KWARGS[name])
    return dict(BILEVEL_KWARGS) if isinstance(get(name), bilevel.BilevelMethod) else {}


#: where this child appends its CPU seconds before it dies or ends (the parent sums them for the report)
CPU_LOG: list[str] = []


def _record_cpu() -> None:
    if CPU_LOG:
        import time

        with open(CPU_LOG[0], "a") as fh:
            fh.write(f"{time.process_time():.3f}\n")


def _die() -> None:
    _record_cpu()
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(kill: dict | None) -> None:
    """Patch this process so that it kills itself at `kill` = ``{"at": lower|upper|save, "n": int}``."""
    if not kill:
        return
    at, n = kill["at"], int(kill["n"])
    calls = {"count": 0}

    def hit() -> bool:
        calls["count"] += 1
        return calls["count"] == n

    if at == "lower":
        real = train_module._check_finite

        def check_finite(terms, step):  # called once per lower step, after the forward pass
            real(terms, step)
            if hit():
                _die()

        train_module._check_finite = check_finite
    elif at == "upper":
        from auxnb.methods import autolambda

        def die_after(module, name):  # the call that computes φ's gradient, before φ moves
            real = getattr(module, name)

            def wrapped(*args, **kwargs):
                out = real(*args, **kwargs)
                if hit():
                    _die()
                return out

            setattr(module, name, wrapped)

        die_after(bilevel, "implicit_grad")  # inside BilevelMethod.upper_step
        # Auto-Lambda's upper step takes a finite difference instead of implicit_grad (issue 24)
        die_after(autolambda, "finite_difference_hypergrad")
    elif at == "save":
        real_replace = ckpt_io.os.replace

        class _OS:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):  # the new checkpoint is written to a temporary file: cut it, die
                if os.path.basename(dst) == "checkpoint.pt" and hit():
                    size = os.path.getsize(src)
                    with open(src, "r+b") as fh:
                        fh.truncate(size // 2)
                    _die()
                return real_replace(src, dst)

        ckpt_io.os = _OS()
    else:
        raise ValueError(kill)


def result_record(result) -> dict:
    """What must be identical between an interrupted and an uninterrupted run."""
    history = result.history.drop(columns=["seconds"])
    return {
        "val": result.val_metric, "test": result.test_metric, "best_step": result.best_step,
        "history": history, "trace": result.trace, "trace_trials": result.trace_trials,
        # a selected run (the guard, HPO-tune): which candidate was kept, and every candidate's own run
        "selection": result.config.get("selection"),
        "candidates": {k: {"val": r.val_metric, "test": r.test_metric, "best_step": r.best_step,
                           "history": r.history.drop(columns=["seconds"]), "trace": r.trace}
                       for k, r in result.candidates.items()},
    }


def count_lower_steps() -> dict:
    """Count the lower steps this process trains (wraps the once-per-lower-step check)."""
    real, calls = train_module._check_finite, {"count": 0}

    def check_finite(terms, step):
        calls["count"] += 1
        real(terms, step)

    train_module._check_finite = check_finite
    return calls


def train(method: str, seed: int, checkpoint_dir: str | None, kill: dict | None, out: str) -> None:
    torch.set_num_threads(1)
    CPU_LOG[:] = [out + ".cpu"]
    install_kill(kill)
    calls = count_lower_steps()
    result = experiments.run(
        "digits-rotation", method, seed=seed, progress=False, device="cpu", method_kwargs=method_kwargs(method),
        checkpoint_dir=checkpoint_dir, resume="auto" if checkpoint_dir else False, **RUN,
    )
    with open(out, "wb") as fh:
        pickle.dump({**result_record(result), "total_s": result.timings["total_s"], "lower_calls": calls["count"]}, fh)
    _record_cpu()


SWEEP = {"settings": "digits-rotation", "methods": ["stl", "uncert"], "seeds": [0, 1]}


def sweep(runs_dir: str, table: str, kill: dict | None, out: str) -> None:
    torch.set_num_threads(1)
    CPU_LOG[:] = [out + ".cpu"]
    if kill and kill["at"] != "run":
        install_kill(kill)
    if kill and kill["at"] == "run":  # between runs: die when the n-th run starts
        real_run, calls = experiments.core.run, {"count": 0}

        def run(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == kill["n"]:
                _die()
            return real_run(*args, **kwargs)

        experiments.core.run = run
    lower = count_lower_steps()
    result = experiments.sweep(
        SWEEP["settings"], SWEEP["methods"], SWEEP["seeds"], out_dir=runs_dir, out=table, device="cpu", progress=False,
        **RUN,
    )
    with open(out, "wb") as fh:
        pickle.dump({"table": result, "lower_calls": lower["count"]}, fh)
    _record_cpu()
