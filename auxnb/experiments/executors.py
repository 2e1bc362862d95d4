"""Where the runs of a sweep execute: in this process, in N local processes, or as Ray tasks.

An executor only runs picklable jobs and hands each result back to the caller, in the calling
process, as soon as it is finished; writing results (per-run files, resuming) is the caller's
business (`experiments.sweep`, `benchmarks/low_data.py`). So every executor produces the same
files, and a killed sweep loses at most the runs that were in flight.

* ``local``: one run after another in this process (the default; today's behaviour).
* ``processes``: up to `jobs` runs at once on this machine, one fresh process per run
  (forked when this process has not initialised CUDA, so imports are shared; else spawned).
  On a CUDA machine `runs_per_gpu` packs that many runs on each visible GPU; devices are
  handed out round-robin from a pool of slots, so a finished run frees its slot for the next.
  Each run sees its device as ``$AUXNB_DEVICE`` and gets ``min(this process's torch threads,
  cpu_count // jobs)`` threads.
* ``ray``: every run is a Ray task with fractional ``num_gpus = 1/runs_per_gpu`` and
  ``num_cpus``; connects to ``$RAY_ADDRESS`` when set (an existing cluster), else starts a
  local instance. Needs the ``ray`` extra: ``pip install "auxnb[ray]"``.

A run whose worker *process dies* (SIGKILL, the OOM killer, a crashed Ray worker) is started
again up to ``retries`` times; after that, with ``on_death``, it becomes the value
``on_death(i, job, cause)`` (a sweep's failed row naming the cause) and the other runs go on;
without it the map stops with `RunFailed` as before. A Ray instance this executor started is
shut down when its map ends (normally, by an error or by SIGINT/SIGTERM), and a watchdog process
stops it if the driver is killed outright (SIGKILL).

Example:
    >>> ex = get_executor("local")
    >>> ex.map(pow, [(2, 3), (3, 2)])
    [8, 9]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

__all__ = ["Executor", "LocalExecutor", "ProcessExecutor", "RayExecutor", "get_executor", "EXECUTORS", "RunFailed",
           "death_cause"]

EXECUTORS = ("local", "processes", "ray")

OnResult = Callable[[int, Any], None]
#: ``on_death(job index, job args, cause)`` -> the value that stands for a run whose worker died.
OnDeath = Callable[[int, tuple, str], Any]


def death_cause(exitcode: int | None) -> str:
    """Why a worker process ended without a result, in words (its signal or exit code)."""
    import signal

    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory, or killed by a user or the scheduler)" if name == "SIGKILL" else ""
        return f"its worker process was killed by {name}{hint}"
    return f"its worker process exited with code {exitcode} without a result"


class RunFailed(RuntimeError):
    """A job's process died without a result (or raised an exception that does not pickle)."""

    def __init__(self, index: int, args: tuple, detail: str):
        super().__init__(f"run {index} {args!r} failed:\n{detail}")
        self.index, self.job_args, self.detail = index, args, detail


def _reraise(index: int, args: tuple, err: BaseException | None, detail: str):
    """Raise the worker's own exception (same type as with ``local``), its traceback as a note."""
    if isinstance(err, Exception):
        err.add_note(f"(in run {index} of the sweep, args {args!r}; worker traceback:\n{detail})")
        raise err
    raise RunFailed(index, args, detail)


@dataclass
class Executor:
    """Base class: ``map(fn, jobs, on_result)`` calls ``fn(*job)`` for every job.

    `on_result(i, value)` is called in this process as each job finishes (in completion order);
    `map` returns the values in job order. The first failing job raises `RunFailed` after the
    jobs already running have been stopped (their finished siblings were already reported);
    it raises the job's own exception (a `RunFailed` when its process died without one).
    """

    name = "base"

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple], on_result: OnResult | None = None, *,
            retries: int = 0, on_death: OnDeath | None = None) -> list[Any]:
        raise NotImplementedError


@dataclass
class LocalExecutor(Executor):
    """One job after another in this process."""

    name = "local"

    def map(self, fn, jobs, on_result=None, *, retries=0, on_death=None):
        out = []  # a job here cannot die apart from this process: retries and on_death are unused
        for i, job in enumerate(jobs):
            value = fn(*job)
            if on_result is not None:
                on_result(i, value)
            out.append(value)
        return out


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - torch is a dependency
        return 0


def _threads_per_run(concurrent: int) -> int:
    """This process's torch thread count, at most the cores per concurrent run (never oversubscribe:
    OpenMP threads spin-waiting on a busy machine can make a run many times slower)."""
    import torch

    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // max(concurrent, 1)))


def _start_method() -> str:
    """``fork`` (no re-import, no ``__main__`` guard needed) unless this process has initialised
    CUDA, which a forked child cannot use; then ``spawn``."""
    import torch

    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _die_with_parent() -> None:
    """Linux: this run's process is killed when its parent dies (a SIGKILLed sweep leaves no orphans)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: orphans finish their run and exit when the pipe is gone
        pass


def _child(conn, fn, job, device: str | None, threads: int) -> None:
    """Body of one run's process: pin device and threads, run, send ("ok", value) or ("err", tb)."""
    _die_with_parent()
    os.environ["OMP_NUM_THREADS"] = os.environ["AUXNB_THREADS"] = str(threads)  # the Trainer's threads too
    if device is not None:
        os.environ["AUXNB_DEVICE"] = device
    try:
        import torch

        torch.set_num_threads(threads)
        value = fn(*job)
        conn.send(("ok", value))
    except BaseException as err:
        detail = traceback.format_exc()
        try:
            conn.send(("err", err, detail))
        except Exception:  # an exception that does not pickle
            conn.send(("err", None, detail))
    finally:
        conn.close()


@dataclass
class ProcessExecutor(Executor):
    """Up to `jobs` concurrent runs on this machine, one process per run.

    Args:
        jobs: concurrent runs; default: ``len(GPUs) * runs_per_gpu`` on a CUDA machine, else
            the number of CPU cores.
        runs_per_gpu: runs packed on each visible GPU (ignored without CUDA).
        threads: torch threads per run; default ``min(torch.get_num_threads(), cpu_count // jobs)``, at least 1.
        start_method: multiprocessing start method; default ``fork`` unless CUDA is initialised here.
    """

    jobs: int | None = None
    runs_per_gpu: int = 1
    threads: int | None = None
    start_method: str | None = None
    name = "processes"

    def __post_init__(self):
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"jobs={self.jobs}: must be >= 1.")
        if self.runs_per_gpu < 1:
            raise ValueError(f"runs_per_gpu={self.runs_per_gpu}: must be >= 1.")

    def slots(self) -> list[str | None]:
        """The device of each concurrent slot: ``cuda:k`` round-robin over GPUs, else None (CPU)."""
        gpus = _visible_gpus()
        if gpus:
            n = self.jobs or gpus * self.runs_per_gpu
            return [f"cuda:{i % gpus}" for i in range(n)]
        return [None] * (self.jobs or os.cpu_count() or 1)

    def map(self, fn, jobs, on_result=None, *, retries=0, on_death=None):
        jobs = [tuple(j) for j in jobs]
        if not jobs:
            return []
        slots = self.slots()
        threads = self.threads or _threads_per_run(len(slots))
        ctx = mp.get_context(self.start_method or _start_method())
        free = list(range(len(slots)))
        pending = list(range(len(jobs)))
        deaths = [0] * len(jobs)
        running: dict[Any, tuple[int, int, Any, Any]] = {}  # sentinel -> (job index, slot, process, conn)
        results: dict[int, Any] = {}
        try:
            while pending or running:
                while pending and free:
                    i, slot = pending.pop(0), free.pop(0)
                    parent, child = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_child, args=(child, fn, jobs[i], slots[slot], threads), daemon=True)
                    proc.start()
                    child.close()
                    running[proc.sentinel] = (i, slot, proc, parent)
                for sentinel in wait(list(running)):
                    i, slot, proc, conn = running.pop(sentinel)
                    try:
                        message = conn.recv()
                    except EOFError:
                        message = None
                    proc.join()
                    conn.close()
                    free.append(slot)
                    if message is None:  # the process died without a result
                        cause = death_cause(proc.exitcode)
                        deaths[i] += 1
                        if deaths[i] <= retries:
                            pending.insert(0, i)  # again, before the runs not yet started
                            continue
                        if on_death is None:
                            _reraise(i, jobs[i], None, cause)
                        message = ("ok", on_death(i, jobs[i], f"{cause} (after {deaths[i]} attempt{'s' if deaths[i] > 1 else ''})"))
                    if message[0] != "ok":
                        _reraise(i, jobs[i], message[1], message[2])
                    results[i] = message[1]
                    if on_result is not None:
                        on_result(i, message[1])
        finally:
            for i, slot, proc, conn in running.values():
                proc.kill()
                proc.join()
                conn.close()
        return [results[i] for i in range(len(jobs))]


_RAY_HINT = 'The ray executor needs Ray: pip install "auxnb[ray]" (or pip install ray).'


def _ray():
    try:
        import ray
    except ImportError as err:
        raise ImportError(_RAY_HINT) from err
    return ray


def _ray_body(fn, job, threads):
    import torch

    os.environ["AUXNB_THREADS"] = str(threads)  # the Trainer's threads (auxnb.runtime)
    torch.set_num_threads(threads)
    return fn(*job)


@dataclass
class RayExecutor(Executor):
    """Every job a Ray task. Connects to ``$RAY_ADDRESS`` (or `address`) when set, else starts Ray locally.

    Args:
        num_cpus: CPUs reserved per run (also its torch thread count, at least 1).
        num_gpus: GPUs per run; default ``1 / runs_per_gpu`` when the cluster has GPUs, else 0.
        runs_per_gpu: runs packed on each GPU.
        address: Ray address; default ``$RAY_ADDRESS``, else a new local instance.
        init_kwargs: passed to ``ray.init`` when this executor starts Ray (e.g. ``num_cpus=2``).
    """

    num_cpus: float = 1
    num_gpus: float | None = None
    runs_per_gpu: int = 1
    address: str | None = None
    init_kwargs: dict | None = None
    name = "ray"

    def __post_init__(self):
        if self.runs_per_gpu < 1:
            raise ValueError(f"runs_per_gpu={self.runs_per_gpu}: must be >= 1.")
        _ray()  # fail early, with the install hint

    def _connect(self):
        """Ray, connected; returns ``(ray, started)``: whether this call started a local instance."""
        ray = _ray()
        started = False
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or None
            kwargs = dict(self.init_kwargs or {})
            kwargs.setdefault("include_dashboard", False)
            kwargs.setdefault("log_to_driver", False)
            if address:
                ray.init(address=address, **{k: v for k, v in kwargs.items() if k not in ("num_cpus", "num_gpus")})
            else:
                ray.init(**kwargs)
                started = True
        return ray, started

    def map(self, fn, jobs, on_result=None, *, retries=0, on_death=None):
        jobs = [tuple(j) for j in jobs]
        if not jobs:
            return []
        ray, started = self._connect()
        watchdog = _ray_watchdog() if started else None
        try:
            with _signals_raise():
                return self._map(ray, fn, jobs, on_result, retries, on_death)
        finally:
            if started:  # stop what this map started, however it ends
                ray.shutdown()
            if watchdog is not None:
                _stop_watchdog(watchdog)

    def _map(self, ray, fn, jobs, on_result, retries, on_death):
        from ray.exceptions import RayTaskError

        gpus = self.num_gpus
        if gpus is None:
            gpus = 1.0 / self.runs_per_gpu if ray.cluster_resources().get("GPU", 0) > 0 else 0
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=gpus, max_retries=0)(_ray_body)
        threads = max(1, int(self.num_cpus))
        refs = {remote.remote(fn, job, threads): i for i, job in enumerate(jobs)}
        deaths = [0] * len(jobs)
        results: dict[int, Any] = {}
        left = list(refs)
        try:
            while left:
                done, left = ray.wait(left, num_returns=1)
                i = refs.pop(done[0])
                try:
                    value = ray.get(done[0])
                except RayTaskError as err:  # the job raised: its own exception, as with local
                    cause = getattr(err, "cause", None)
                    _reraise(i, jobs[i], cause if isinstance(cause, Exception) else None, str(err))
                except Exception as err:  # the worker died (WorkerCrashedError, OOM, node lost)
                    deaths[i] += 1
                    cause = f"its Ray worker died ({type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''})"
                    if deaths[i] <= retries:
                        ref = remote.remote(fn, jobs[i], threads)
                        refs[ref] = i
                        left.append(ref)
                        continue
                    if on_death is None:
                        _reraise(i, jobs[i], None, cause)
                    value = on_death(i, jobs[i], f"{cause} (after {deaths[i]} attempt{'s' if deaths[i] > 1 else ''})")
                results[i] = value
                if on_result is not None:
                    on_result(i, value)
        finally:
            for ref in left:
                ray.cancel(ref, force=True)
        return [results[i] for i in range(len(jobs))]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that ``finally`` blocks (Ray's shutdown) run."""


class _signals_raise:
    """In the main thread: SIGTERM raises `_Terminated` (SIGINT already raises KeyboardInterrupt)."""

    def __enter__(self):
        import signal
        import threading

        self.previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise _Terminated(f"signal {signum}")

            self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


#: The watchdog (a separate session, its parent is the driver): every half second it notes the
#: driver's descendant processes; when its stdin closes (the driver exited or was killed) it
#: SIGKILLs those still alive (same start time) that are Ray's: gcs, raylet, the raylet's agents
#: and workers, which a killed driver otherwise leaves running (re-parented to init).
_WATCHDOG = r"""
import os, select, signal, sys
me, driver = os.getpid(), os.getppid()

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]  # ppid, start time
    except (OSError, IndexError, ValueError):
        return None

def ray_like(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"ray" in fh.read()
    except OSError:
        return False

def descendants(roots):
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = stat(int(name))
            if info is not None:
                table[int(name)] = info
    found, frontier = {}, set(roots)
    while frontier:
        children = {pid for pid, (ppid, _) in table.items() if ppid in frontier and pid not in found and pid != me}
        for pid in children:
            found[pid] = table[pid][1]
        frontier = children
    return found

known = {}
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.5)
    if ready and not os.read(sys.stdin.fileno(), 4096):
        break
    known.update(descendants([driver]))
known.update(descendants(list(known)))
for pid, start in known.items():
    info = stat(pid)
    if info is not None and info[1] == start and ray_like(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def _ray_watchdog():
    """A process that stops this driver's Ray instance if the driver dies without shutting it down."""
    import subprocess
    import sys

    if not os.path.isdir("/proc"):  # pragma: no cover - not Linux: Ray's own atexit / signal paths only
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop_watchdog(proc) -> None:
    proc.kill()  # Ray was shut down by the driver itself: the watchdog has nothing to do
    proc.wait()
    if proc.stdin is not None:
        proc.stdin.close()


def get_executor(name: str | Executor = "local", *, jobs: int | None = None, runs_per_gpu: int = 1, **kwargs: Any) -> Executor:
    """An executor by name (``local``, ``processes``, ``ray``), or `name` itself if it is one.

    `jobs` is the number of concurrent runs for ``processes``; for ``ray`` the cluster decides
    (use `num_cpus` / `num_gpus` per run). `runs_per_gpu` packs runs on each GPU for both.
    """
    if isinstance(name, Executor):
        return name
    if name == "local":
        return LocalExecutor()
    if name == "processes":
        return ProcessExecutor(jobs=jobs, runs_per_gpu=runs_per_gpu, **kwargs)
    if name == "ray":
        return RayExecutor(runs_per_gpu=runs_per_gpu, **kwargs)
    raise ValueError(f"Unknown executor {name!r}; use one of {', '.join(EXECUTORS)}.")
