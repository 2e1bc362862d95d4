"""Threads and devices (auxnb.runtime): the default, the precedence, and that fit restores torch's setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from auxnb import MultiHeadModel, Task, TaskDataset, TaskSet, Trainer, runtime
from auxnb.data import build_bundle
from auxnb.models import make_head

TASKS = TaskSet([Task("y", "classification", 3, primary=True)])


def _trainer(**kw):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    data = build_bundle(TaskDataset.from_numpy(x, {"y": y}), TASKS, val_size=10, test_size=10, dev_size=0, seed=0)
    def model():  # a model_fn: each Trainer builds it under its seed, so runs start from the same weights
        return MultiHeadModel(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), {"y": make_head(8, 3)})

    return Trainer(model, "stl", data, steps=3, eval_every=1, device="cpu", progress=False, **kw)


def test_threads_come_from_the_argument_then_the_environment_then_one(monkeypatch):
    monkeypatch.delenv("AUXNB_THREADS", raising=False)
    assert runtime.resolve_threads() == 1 == runtime.DEFAULT_THREADS
    monkeypatch.setenv("AUXNB_THREADS", "3")
    assert runtime.resolve_threads() == 3
    assert runtime.resolve_threads(2) == 2  # the argument wins over the environment
    assert runtime.resolve_threads(0) == runtime.TORCH_DEFAULT_THREADS  # 0: torch's own default
    monkeypatch.setenv("AUXNB_THREADS", " ")
    assert runtime.resolve_threads() == 1  # empty: unset


@pytest.mark.parametrize("threads", [1, 2])
def test_fit_computes_on_the_threads_asked_for_and_restores_torchs_setting(threads, monkeypatch):
    monkeypatch.delenv("AUXNB_THREADS", raising=False)
    torch.set_num_threads(3)  # whatever the caller had
    seen = []
    trainer = _trainer(threads=threads, callbacks=[lambda event, info: seen.append(torch.get_num_threads())])
    trainer.fit()
    assert seen and set(seen) == {threads}
    assert torch.get_num_threads() == 3


def test_fit_restores_the_threads_when_training_fails(monkeypatch):
    torch.set_num_threads(3)

    def boom(event, info):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _trainer(threads=1, callbacks=[boom]).fit()
    assert torch.get_num_threads() == 3


def test_the_default_trainer_uses_one_thread_and_the_environment_overrides_it(monkeypatch):
    monkeypatch.delenv("AUXNB_THREADS", raising=False)
    assert _trainer().threads == 1
    monkeypatch.setenv("AUXNB_THREADS", "2")
    assert _trainer().threads == 2


def test_one_thread_and_two_threads_give_the_same_predictions_here():
    # the run's numbers do not depend on the thread count for this small model (same seed, same data)
    a = _trainer(threads=1).fit()
    b = _trainer(threads=2).fit()
    assert a.val_metric == b.val_metric
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.predict(x), b.predict(x))


def test_cpu_and_meta_pass_the_device_check_and_an_unavailable_backend_is_refused():
    assert runtime.check_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(RuntimeError, match="'mps'.*device='cpu'"):
            runtime.check_device(torch.device("mps"))
