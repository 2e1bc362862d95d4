"""A sweep row that waits to be killed (tests/test_workers.py); not a test module.

`victim_row` stands in for `auxnb.experiments.core._sweep_row`: the victim run's worker writes
its process id to ``$AUXNB_KILL_DIR/pid`` and waits; the test kills that pid and marks
``killed``; a retried attempt (or any other run) is the real row.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from auxnb.experiments import core

REAL_ROW = core._sweep_row


def victim_row(setting, method, seed, *rest):
    folder = Path(os.environ["AUXNB_KILL_DIR"])
    if int(seed) == int(os.environ["AUXNB_KILL_SEED"]) and not (folder / "killed").exists():
        (folder / "pid.tmp").write_text(str(os.getpid()))
        os.replace(folder / "pid.tmp", folder / "pid")
        time.sleep(120)  # killed long before this ends
        raise RuntimeError("the test did not kill this worker")
    return REAL_ROW(setting, method, seed, *rest)
