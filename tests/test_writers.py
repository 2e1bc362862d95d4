"""Writers: one run per checkpoint folder (a lock naming its holder), writable folders checked before
training, unique temporary names, and a full disk reported as such with nothing left behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import fit  # noqa: E402

from auxnb import checkpoint as ckpt_io  # noqa: E402
from auxnb.__main__ import main  # noqa: E402
from auxnb.checkpoint import FolderInUse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock until killed."""
    code = ("import sys, time; from auxnb.checkpoint import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_into_a_held_folder_is_refused_up_front_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUse) as err:
            fit(checkpoint_dir=tmp_path)
        message = str(err.value)
        assert f"pid {proc.pid}" in message and str(tmp_path) in message and "another checkpoint directory" in message
        assert not (tmp_path / "checkpoint.pt").exists()  # refused before any training
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert f"pid {proc.pid}" in (tmp_path / ckpt_io.LOCK_NAME).read_text()  # the stale record is still there
    result = fit(checkpoint_dir=tmp_path)
    assert result.val_metric == fit().val_metric
    assert f"pid {os.getpid()}" in (tmp_path / ckpt_io.LOCK_NAME).read_text()


def test_a_lock_file_naming_a_dead_pid_is_not_a_lock(tmp_path):
    (tmp_path / ckpt_io.LOCK_NAME).write_text("pid 999999999 on elsewhere")
    fit(checkpoint_dir=tmp_path)
    assert (tmp_path / "checkpoint.pt").exists()


def test_two_runs_in_one_process_into_one_folder_are_refused(tmp_path):
    with ckpt_io.folder_lock(tmp_path):
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
            fit(checkpoint_dir=tmp_path)


def test_cli_run_into_a_held_folder_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AUXNB_DEVICE", "cpu")
    proc = _holder(tmp_path / "ck")
    try:
        code = main(["run", "digits-rotation", "--scale", "smoke", "--no-progress", "--checkpoint-dir", str(tmp_path / "ck")])
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    assert code == 2 and "in use by another run" in err and f"pid {proc.pid}" in err and "Traceback" not in err


def test_an_unwritable_checkpoint_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AUXNB_DEVICE", "cpu")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["run", "digits-rotation", "--scale", "smoke", "--no-progress", "--checkpoint-dir", str(blocker / "ck")])
    err = capsys.readouterr().err
    assert code == 2 and "not writable" in err and "nothing was trained" in err and "Traceback" not in err


def _enospc_on_tmp(monkeypatch):
    import builtins

    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".tmp"):
            fh = real_open(file, mode, *args, **kwargs)
            fh.close()  # the temporary exists (as it would), then the first write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)


def test_a_full_disk_while_writing_a_csv_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    _enospc_on_tmp(monkeypatch)
    with pytest.raises(OSError, match="Disk full") as err:
        ckpt_io.write_csv(tmp_path / "run.csv", pd.DataFrame({"a": [1]}))
    assert str(tmp_path / "run.csv") in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_plan_on_a_full_disk_says_disk_full_and_leaves_no_empty_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUXNB_DEVICE", "cpu")
    _enospc_on_tmp(monkeypatch)
    code = main(["plan", "--settings", "digits-rotation", "--methods", "stl", "--scale", "smoke", "--seeds", "1",
                 "--probe-steps", "1", "--out", "plan.csv"])
    err = capsys.readouterr().err
    assert code == 2 and "Disk full" in err and "plan.csv" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_checkpoint_write_stops_the_run_saying_so(tmp_path, monkeypatch):
    _enospc_on_tmp(monkeypatch)
    with pytest.raises(OSError, match="Disk full") as err:
        fit(checkpoint_dir=tmp_path)
    assert "checkpoint.pt" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt_io.LOCK_NAME]  # no checkpoint, no temporary


def test_a_sweep_run_whose_folder_is_held_fails_without_deleting_the_holders_checkpoints(tmp_path):
    from auxnb.experiments import core, sweep

    runs = tmp_path / "runs"
    runs.mkdir()
    path = core._run_file(runs, "digits-rotation", "stl", 0, "smoke", {}, None, guard=None)  # the sweep's default guard
    folder = core._checkpoint_dir(path)
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"the holder's")
    proc = _holder(folder)
    try:
        table = sweep("digits-rotation", ["stl"], [0], scale="smoke", progress=False, device="cpu", out_dir=runs)
    finally:
        proc.kill()
        proc.wait()
    assert table.loc[0, "status"] == "failed" and "in use by another run" in table.loc[0, "error"]
    assert (folder / "checkpoint.pt").read_bytes() == b"the holder's"
