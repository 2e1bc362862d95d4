"""A killed worker never stops a sweep: its run is retried (``retries``) or becomes a failed row
naming the cause, the other runs go on, and the table equals a sequential sweep's.

Each test kills one worker process by its pid (SIGKILL, from a thread of the test) while the
sweep runs, in the ``processes`` and the ``ray`` executor; the Ray driver killed outright leaves
no Ray process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import auxnb.experiments.core as core
from auxnb.experiments import sweep
from auxnb.experiments.executors import ProcessExecutor, RunFailed, death_cause

sys.path.insert(0, str(Path(__file__).parent))
import kill_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KW = dict(scale="smoke", progress=False, device="cpu")


def _table(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["seconds"]).reset_index(drop=True)


class _Killer(threading.Thread):
    """Waits for the victim's pid file, SIGKILLs that pid, marks ``killed``."""

    def __init__(self, folder: Path, timeout: float = 240):
        super().__init__(daemon=True)
        self.folder, self.timeout, self.pid = folder, timeout, None

    def run(self):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if (self.folder / "pid").exists():
                self.pid = int((self.folder / "pid").read_text())
                (self.folder / "killed").write_text(str(self.pid))
                os.kill(self.pid, signal.SIGKILL)
                return
            time.sleep(0.05)


@pytest.fixture
def victim(tmp_path, monkeypatch):
    folder = tmp_path / "kill"
    folder.mkdir()
    monkeypatch.setenv("AUXNB_KILL_DIR", str(folder))
    monkeypatch.setenv("AUXNB_KILL_SEED", "1")
    monkeypatch.setattr(core, "_sweep_row", kill_worker.victim_row)
    killer = _Killer(folder)
    killer.start()
    return killer


def test_death_cause_names_the_signal():
    assert "SIGKILL" in death_cause(-9) and "out of memory" in death_cause(-9)
    assert "SIGTERM" in death_cause(-15) and "code 3" in death_cause(3)


def _suicide(x):
    if x == 1 and not os.path.exists(os.environ["AUXNB_KILL_DIR"] + "/killed"):
        open(os.environ["AUXNB_KILL_DIR"] + "/killed", "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 10


def test_processes_map_retries_a_dead_worker_or_reports_it_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("AUXNB_KILL_DIR", str(tmp_path))
    seen = []
    got = ProcessExecutor(jobs=2).map(_suicide, [(0,), (1,), (2,)], on_result=lambda i, v: seen.append(i), retries=1)
    assert got == [0, 10, 20] and sorted(seen) == [0, 1, 2]
    (tmp_path / "killed").unlink()
    got = ProcessExecutor(jobs=2).map(_suicide, [(0,), (1,), (2,)], on_death=lambda i, job, cause: f"dead: {cause}")
    assert got[0] == 0 and got[2] == 20 and got[1].startswith("dead: ") and "SIGKILL" in got[1]
    (tmp_path / "killed").unlink()
    with pytest.raises(RunFailed, match="SIGKILL"):  # without on_death: as before, the map stops
        ProcessExecutor(jobs=2).map(_suicide, [(0,), (1,), (2,)])


def test_processes_sweep_with_a_killed_worker_and_retries_equals_a_sequential_sweep(victim, tmp_path):
    got = sweep("digits-rotation", ["stl"], [0, 1, 2], out_dir=tmp_path / "par", executor="processes", jobs=2, retries=1,
                out=tmp_path / "all.csv", **KW)
    assert victim.pid is not None, "no worker was killed"
    core._sweep_row = kill_worker.REAL_ROW
    seq = sweep("digits-rotation", ["stl"], [0, 1, 2], **KW)
    pd.testing.assert_frame_equal(_table(got), _table(seq))
    table = pd.read_csv(tmp_path / "all.csv")
    assert sorted(table["seed"]) == [0, 1, 2] and set(table["status"]) == {"ok"}  # each run exactly once
    assert len(list((tmp_path / "par").glob("*.csv"))) == 3


def test_processes_sweep_without_retries_records_the_dead_worker_as_a_failed_row(victim, tmp_path):
    with pytest.warns(core.SweepWarning, match="SIGKILL"):
        got = sweep("digits-rotation", ["stl"], [0, 1, 2], executor="processes", jobs=2, retries=0, **KW)
    assert victim.pid is not None
    assert list(got["seed"]) == [0, 1, 2] and list(got["status"]) == ["ok", "failed", "ok"]
    assert "SIGKILL" in got.loc[1, "error"] and "WorkerDied" in got.loc[1, "error"]
    core._sweep_row = kill_worker.REAL_ROW
    seq = sweep("digits-rotation", ["stl"], [0, 2], **KW)
    # the others were not disturbed (best_step is float there: the failed row has none)
    pd.testing.assert_frame_equal(_table(got.iloc[[0, 2]]), _table(seq), check_dtype=False)


@pytest.fixture
def ray_local(victim):
    ray = pytest.importorskip("ray", reason='the ray extra: pip install "auxnb[ray]"')
    env = {k: os.environ[k] for k in ("AUXNB_KILL_DIR", "AUXNB_KILL_SEED")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", **env}})
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # one Ray instance at a time on the machine (tests/run.sh: --dist loadgroup)
def test_ray_sweep_with_a_killed_worker_and_retries_equals_a_sequential_sweep(ray_local, victim, tmp_path):
    # the Ray workers are separate processes: they read the kill settings from their environment
    got = sweep("digits-rotation", ["stl"], [0, 1, 2], executor=_ray_executor(tmp_path), retries=1, **KW)
    assert victim.pid is not None, "no worker was killed"
    core._sweep_row = kill_worker.REAL_ROW
    seq = sweep("digits-rotation", ["stl"], [0, 1, 2], **KW)
    pd.testing.assert_frame_equal(_table(got), _table(seq))


def _ray_executor(tmp_path):
    from auxnb.experiments.executors import RayExecutor

    return RayExecutor()


def _ray_descendants(root: int) -> list[int]:
    """Ray's processes among the descendants of `root` (gcs, raylet, agents, workers)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    parent[int(name)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in found}
        found |= frontier
    out = []
    for pid in found:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"ray" in fh.read():
                    out.append(pid)
        except OSError:
            pass
    return sorted(out)


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # one Ray instance at a time on the machine (tests/run.sh: --dist loadgroup)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_killed_ray_driver_leaves_no_ray_process_behind(tmp_path, sig):
    pytest.importorskip("ray")
    code = (
        # a terminal's driver: SIGINT raises KeyboardInterrupt (a disposition inherited from the test process,
        # e.g. SIGINT ignored by something that ran earlier in this pytest worker, is reset first)
        "import signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])\n"
        "from auxnb.experiments.executors import RayExecutor\n"
        "def slow(x):\n    print('running', flush=True); time.sleep(600); return x\n"
        "RayExecutor(init_kwargs={'num_cpus': 1, 'log_to_driver': True}).map(slow, [(1,)])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert "running" in proc.stdout.readline()  # the task runs: Ray's processes are all up
    time.sleep(1.5)  # the watchdog has seen them
    pids = _ray_descendants(proc.pid)
    assert len(pids) >= 3, f"expected gcs, raylet and a worker under the driver, found {pids}"
    proc.send_signal(sig)
    # the task sleeps 600 s: a driver that ignored the signal would still be waiting for it at this timeout
    proc.wait(timeout=120)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:  # leave nothing running on a failure either
        os.kill(p, signal.SIGKILL)
    assert not left, "Ray processes outlived their killed driver"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
