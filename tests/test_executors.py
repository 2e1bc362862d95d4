"""Sweep executors (issue 14): same files and numbers as a sequential sweep, resume after SIGKILL, Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from auxnb.experiments import executors, sweep
from auxnb.experiments.executors import ProcessExecutor, get_executor

ROOT = Path(__file__).resolve().parents[1]


def _square(x):
    return x * x


def _fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


def _device_env(_):
    return os.environ.get("AUXNB_DEVICE"), os.environ.get("OMP_NUM_THREADS")


def test_processes_map_matches_local_and_reports_in_completion_order():
    jobs = [(i,) for i in range(5)]
    seen = []
    got = ProcessExecutor(jobs=2).map(_square, jobs, on_result=lambda i, v: seen.append((i, v)))
    assert got == get_executor("local").map(_square, jobs) == [0, 1, 4, 9, 16]
    assert sorted(seen) == [(i, i * i) for i in range(5)]  # every result reported exactly once


def test_processes_reraise_the_worker_exception_type():
    with pytest.raises(ValueError, match="bad input 2"):
        ProcessExecutor(jobs=2).map(_fail_on, [(1, 2), (2, 2), (3, 2)])


def test_runs_per_gpu_packs_slots_round_robin(monkeypatch):
    monkeypatch.setattr(executors, "_visible_gpus", lambda: 2)
    ex = ProcessExecutor(runs_per_gpu=3)
    assert ex.slots() == ["cuda:0", "cuda:1"] * 3
    # each run's process sees its slot's device as $AUXNB_DEVICE (no CUDA is touched here)
    got = ProcessExecutor(jobs=4, threads=1).map(_device_env, [(i,) for i in range(6)])
    assert {d for d, _ in got} == {"cuda:0", "cuda:1"} and {t for _, t in got} == {"1"}


def test_bad_executor_arguments_are_clear():
    with pytest.raises(ValueError, match="Unknown executor 'threads'.*local, processes, ray"):
        get_executor("threads")
    with pytest.raises(ValueError, match="jobs=0"):
        ProcessExecutor(jobs=0)


def test_ray_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r'auxnb\[ray\]'):
        get_executor("ray")


def _table(path_or_frame):
    t = path_or_frame if isinstance(path_or_frame, pd.DataFrame) else pd.read_csv(path_or_frame)
    return t.drop(columns=["seconds"]).reset_index(drop=True)


def test_processes_sweep_identical_to_sequential(tmp_path):
    kw = dict(scale="smoke", progress=False, device="cpu")
    seq = sweep("digits-rotation", ["stl"], [0, 1], out_dir=tmp_path / "seq", **kw)
    par = sweep("digits-rotation", ["stl"], [0, 1], out_dir=tmp_path / "par", executor="processes", jobs=2, **kw)
    pd.testing.assert_frame_equal(_table(seq), _table(par))
    names = sorted(p.name for p in (tmp_path / "seq").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "par").iterdir()) and len(names) == 2
    for name in names:  # the same per-run files
        pd.testing.assert_frame_equal(_table(tmp_path / "seq" / name), _table(tmp_path / "par" / name))


@pytest.mark.slow
def test_processes_sweep_killed_midway_resumes_without_loss_or_duplicates(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "auxnb", "sweep", "digits-rotation", "--methods", "stl", "--seeds", "0-3",
           "--scale", "smoke", "--device", "cpu", "--no-progress", "--executor", "processes", "--jobs", "2",
           "--runs-dir", str(runs), "--out", str(tmp_path / "all.csv")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(runs.glob("*.csv")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way: at least one run written, others in flight or pending
    proc.wait()
    before = {p.name: p.read_bytes() for p in runs.glob("*.csv")}
    assert 1 <= len(before) < 4, f"kill did not land mid-way ({len(before)} of 4 runs finished)"
    time.sleep(0.5)  # the in-flight runs' processes die with their parent: nothing more appears
    assert {p.name for p in runs.glob("*.csv")} == set(before)

    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = {p.name: p.read_bytes() for p in runs.glob("*.csv")}
    assert len(after) == 4 and all(after[name] == data for name, data in before.items())  # finished runs not re-run
    table = pd.read_csv(tmp_path / "all.csv")
    assert sorted(table["seed"]) == [0, 1, 2, 3]  # nothing lost, nothing duplicated


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # one Ray instance at a time on the machine (tests/run.sh: --dist loadgroup)
def test_ray_local_instance_runs_a_smoke_sweep(tmp_path):
    ray = pytest.importorskip("ray", reason='the ray extra: pip install "auxnb[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    try:
        kw = dict(scale="smoke", progress=False, device="cpu")
        got = sweep("digits-rotation", ["stl"], [0, 1], out_dir=tmp_path / "ray", executor="ray", **kw)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    seq = sweep("digits-rotation", ["stl"], [0, 1], out_dir=tmp_path / "seq", **kw)
    pd.testing.assert_frame_equal(_table(seq), _table(got))
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(p.name for p in (tmp_path / "seq").iterdir())


def test_resident_data_is_a_no_op_on_cpu_and_resident_batches_are_not_copied():
    import torch

    from auxnb.data import DataBundle, TaskDataset
    from auxnb.tasks import Task, TaskSet
    from auxnb.train import _to_device, resident_data

    ds = TaskDataset(torch.arange(12.0).reshape(6, 2), {"y": torch.arange(6) % 2})
    bundle = DataBundle(tasks=TaskSet([Task("y", "classification", 2, primary=True)]), train=ds)
    assert resident_data(bundle, torch.device("cpu")) is bundle  # CPU: nothing to move
    item = ds.gather(torch.tensor([0, 2]))
    same = _to_device(item, torch.device("cpu"))
    assert same[0] is item[0] and same[1] is item[1]  # already there: no copy, no pinning
