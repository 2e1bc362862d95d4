"""The (setting × method) matrix as a contract (issue 12 §1): every registered method on every
registered setting, at ``smoke`` scale on fixture data.

Each cell either trains to the end with a finite metric — a bi-level method taking at least two
upper steps that change φ — or is refused before any work by `auxnb.experiments.REFUSED` with a
`ValueError` naming the method, the setting and the reason. Nothing may crash inside training.
The runs are as small as still says something: 2 lower steps with an upper step after each
(one Neumann term), one evaluation, 2 HPO-tune trials.
"""

from __future__ import annotations

import math

import pytest
import torch

import auxnb.experiments as E
import auxnb.experiments.core as core
from auxnb import methods
from auxnb.methods.bilevel import BilevelMethod

SETTINGS = list(E.settings().setting)
METHODS = methods.names()
CELLS = [(s, m) for s in SETTINGS for m in METHODS]

#: the smallest run that exercises everything: 2 lower steps, an upper step after each
STEPS = 2
#: cifar100-20: only 'people' images (10 of 160 at smoke scale) carry the primary label, so an
#: upper step on 8 training images usually sees none and MAXL's φ gets a true zero hypergradient;
#: 32 images a batch give its upper steps primary labels to learn from
SETTING_OVERRIDES = {"cifar100-20": {"batch_size": 32}}


def _is_bilevel(name: str) -> bool:
    return issubclass(methods._REGISTRY[name], BilevelMethod)


def _method_kwargs(name: str) -> dict:
    if name == "hpo-tune":
        return {"trials": 2}
    if name == "forkmerge":  # a merge after each of the 2 lower steps
        return {"interval": 1}
    if _is_bilevel(name):
        kwargs = {"lower_steps": 1, "terms": 1}
        return {**kwargs, "lookback": 2} if name == "maoal" else kwargs
    return {}


def _phi(method) -> list[torch.Tensor]:
    return [h.detach().clone() for h in method.hparams()]


@pytest.mark.parametrize("setting,method", CELLS, ids=[f"{s}:{m}" for s, m in CELLS])
def test_every_method_runs_on_every_setting_or_is_refused_before_training(setting, method, monkeypatch):
    if method == "aggregator":  # an optional extra: pip install "auxnb[aggregators]"
        pytest.importorskip("torchjd")
    reason = E.refusal(setting, method)
    if reason is not None:
        # refused before any work: neither the data nor a Trainer is made
        monkeypatch.setattr(core, "Trainer", _forbidden("a Trainer was built"))
        monkeypatch.setattr(core, "resolve_config", _forbidden("the config was resolved (the data come next)"))
        with pytest.raises(ValueError) as err:
            E.run(setting, method, scale="smoke", progress=False, device="cpu", steps=STEPS)
        message = str(err.value)
        assert repr(method) in message and repr(setting) in message and reason in message
        return

    made: list = []
    real_get = core.get_method

    def get_method(*args, **kwargs):
        made.append(real_get(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(core, "get_method", get_method)
    before: list[list[torch.Tensor]] = []
    uppers: list[dict] = []

    def on_event(event, info):
        if event == "upper":
            uppers.append(info)

    bilevel = _is_bilevel(method)
    if bilevel:
        # φ as the run's own set-up made it (the Trainer sets the method up again inside fit)
        real_setup = methods._REGISTRY[method].setup

        def setup(self, model, info):
            real_setup(self, model, info)
            before.append(_phi(self))

        monkeypatch.setattr(methods._REGISTRY[method], "setup", setup)
    result = E.run(setting, method, scale="smoke", progress=False, device="cpu", steps=STEPS, eval_every=STEPS,
                   method_kwargs=_method_kwargs(method), callbacks=[on_event], **SETTING_OVERRIDES.get(setting, {}))
    assert result.config["fixture"] is True or not setting.startswith(("cifar", "cub", "pet", "fashion", "movie", "beauty", "toys"))
    assert math.isfinite(result.test_metric) and math.isfinite(result.val_metric), (result.test_metric, result.val_metric)
    assert result.config["steps"] == STEPS and len(result.history) >= 1
    if bilevel:
        (obj,) = made
        assert len(uppers) >= 2, f"{method} on {setting} took {len(uppers)} upper steps"
        after = _phi(obj)
        changed = [not torch.equal(a, b) for a, b in zip(before[-1], after)]
        assert any(changed), f"{method} on {setting}: no φ tensor changed over {len(uppers)} upper steps"
        assert all(torch.isfinite(t).all() for t in after)
    if method == "forkmerge":  # both merges happened, each choosing finite weights that sum to 1
        assert len(uppers) == STEPS
        for info in uppers:
            weights = [v for k, v in info.items() if k.startswith("weight/")]
            assert len(weights) == 2 and all(math.isfinite(w) and w >= 0 for w in weights)
            assert abs(sum(weights) - 1) < 1e-9


def _forbidden(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"a refused pair must be refused before any work, but {what}")

    return fail


def test_the_refused_list_is_short_names_registered_pairs_and_gives_each_a_reason():
    table = E.refused_cells()
    assert len(E.REFUSED) <= 6 and len(table) < len(CELLS) // 10
    assert set(table.setting) <= set(SETTINGS) and set(table.method) <= set(METHODS)
    assert not table.duplicated(["setting", "method"]).any()
    for entry in E.REFUSED:
        assert len(entry.reason) > 40  # a reason, with what to use instead
    # a sweep with a refused pair is refused before its first run
    calls = []
    real = core.run
    core.run = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        with pytest.raises(ValueError, match="'mixup' does not apply to setting 'movielens-l2'"):
            E.sweep(["movielens-l2"], ["stl", "mixup"], seeds=[0], scale="smoke", progress=False, device="cpu")
    finally:
        core.run = real
    assert calls == []


def test_input_mixup_on_integer_inputs_is_refused_by_the_method_before_training():
    # the rating settings' reason, enforced for any user's data too: mixing integer ids means nothing
    from auxnb.data import TaskDataset, build_bundle
    from auxnb.models import AutoInt, MultiHeadModel
    from auxnb.tasks import Task, TaskSet
    from auxnb.train import Trainer

    tasks = TaskSet([Task("rating", "regression", primary=True), Task("click", "binary")])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (60, 3), generator=g)
    data = TaskDataset(x, {"rating": torch.rand(60, generator=g) * 4 + 1, "click": (torch.rand(60, generator=g) > 0.5).float()})
    bundle = build_bundle(data, tasks, val_size=10, test_size=10, dev_size=8, stratify=False)
    for name, alternative in (("mixup", "f-mixup"), ("auto-mix", "auto-f-mix")):
        model = MultiHeadModel.for_tasks(AutoInt((5, 5, 5), embed_dim=4, num_blocks=1, num_heads=1), tasks)
        steps = []
        with pytest.raises(ValueError, match=rf"'{name}' mixes the model's inputs.*torch.int64.*'{alternative}'"):
            Trainer(model, name, bundle, steps=2, batch_size=8, progress=False, device="cpu",
                    callbacks=[lambda e, i: steps.append(e)]).fit()
        assert steps == []


def test_the_book_lists_every_refused_pair():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "book" / "matrix.md").read_text(encoding="utf-8")
    table = E.refused_cells()
    assert f"{len(table)} refused pairs in all, {len(CELLS) - len(table)} that run" in page
    assert f"{len(METHODS)} methods × {len(SETTINGS)} settings, {len(CELLS)} pairs" in page
    for entry in E.REFUSED:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{entry.method}` |"))
        assert ("the 7 rating settings" in row and entry.settings == E.RATING_SETTINGS) or all(s in row for s in entry.settings)
    assert all(f"`{s}`" in page for s in E.RATING_SETTINGS)
