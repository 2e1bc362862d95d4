"""A user's own work in and out: numpy / pandas / torch Dataset data, a wrapped backbone, model_fn,
predict, RunResult.save / load, aux_losses on every method, and plots of what a method learned."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from auxnb import MultiHeadModel, RunResult, Task, TaskDataset, TaskSet, Trainer
from auxnb.data import RotationView, build_bundle
from auxnb.methods import GCS, MAOAL, STL, Equal, compute_terms, l2_penalty
from auxnb.models import MLP, ChildBlocks
from auxnb.partition import by_block

TASKS = TaskSet([Task("y", "classification", 3, primary=True), Task("a", "classification", 2)])


def _numpy_data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))  # float64, as numpy gives it
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)
    a = (x[:, 2] > 0).astype(np.int64)
    return x, y, a


def _bundle(test=True):
    x, y, a = _numpy_data()
    return build_bundle(TaskDataset.from_numpy(x, {"y": y, "a": a}), TASKS, val_size=10, test_size=10 if test else 0,
                        dev_size=6, seed=0)


def _model_fn():
    return MultiHeadModel.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), TASKS, torch.zeros(2, 4))


# ------------------------------------------------------------------ data in
def test_from_numpy_coerces_float64_to_float32_and_ints_to_int64():
    x, y, a = _numpy_data()
    ds = TaskDataset.from_numpy(x, {"y": y.astype(np.int32), "a": a})
    assert ds.inputs.dtype == torch.float32 and ds.targets["y"].dtype == torch.int64
    assert torch.allclose(ds.inputs, torch.tensor(x, dtype=torch.float32))


def test_from_numpy_with_tasks_turns_float_labels_with_nan_into_missing_classes():
    y = np.array([0.0, 2.0, np.nan])
    ds = TaskDataset.from_numpy(np.zeros((3, 1)), {"y": y}, tasks=TASKS)
    assert ds.targets["y"].tolist() == [0, 2, -1]


def test_from_pandas_stacks_inputs_codes_categories_and_keeps_missing_labels():
    df = pd.DataFrame({"f": [0.5, 1.5, 2.5], "c": pd.Categorical(["u", "v", "u"]),
                       "y": pd.array([1, None, 2], dtype="Int64")})
    ds = TaskDataset.from_pandas(df, targets="y", tasks=TASKS)
    assert ds.inputs.tolist() == [[0.5, 0.0], [1.5, 1.0], [2.5, 0.0]]
    assert ds.targets["y"].tolist() == [1, -1, 2]


def test_a_torch_dataset_and_a_dataloader_become_the_same_taskdataset():
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    by_ds = TaskDataset.from_dataset(TensorDataset(x, y), "y")
    by_loader = TaskDataset.from_dataset(DataLoader(TensorDataset(x, y), batch_size=2), "y")
    assert torch.equal(by_ds.inputs, x) and torch.equal(by_loader.targets["y"], y)
    bundle = build_bundle(TensorDataset(torch.randn(40, 4), torch.arange(40) % 3), TaskSet([TASKS[0]]),
                          val_size=5, test_size=5, dev_size=0)
    assert len(bundle.train) == 30


def test_a_bundle_without_test_split_trains_and_reports_nan():
    result = Trainer(_model_fn, "stl", _bundle(test=False), steps=2, batch_size=8, device="cpu", progress=False).fit()
    assert math.isnan(result.test_metric) and not math.isnan(result.val_metric)


# ------------------------------------------------------------------ model in
def test_wrap_infers_out_features_and_blocks_cover_every_parameter_once():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    model = MultiHeadModel.wrap(net, TASKS, np.zeros((2, 4)))
    assert model.out_features == 5
    assert [n for n, _ in model.blocks()] == ["0", "2", "head:y", "head:a"]
    by_block(model)  # raises if a parameter is missing or repeated
    pickle.loads(pickle.dumps(model))  # no lambdas: torch.save(model) works


def test_wrap_a_torchvision_resnet_in_one_line():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10)
    net.fc = nn.Identity()
    model = MultiHeadModel.wrap(net, TASKS, torch.zeros(2, 3, 32, 32))
    assert model.out_features == 512
    assert [n for n, _ in model.backbone.blocks()] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert isinstance(model.backbone, ChildBlocks)


def test_trainer_seed_seeds_the_model_fn_initialisation():
    bundle = _bundle()
    w = [Trainer(_model_fn, "stl", bundle, steps=1, seed=s, device="cpu", progress=False).model.heads["y"].weight
         for s in (0, 0, 1)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_fit_leaves_the_best_weights_in_eval_mode_and_refuses_a_second_run_on_them():
    bundle = _bundle()
    model = _model_fn()
    result = Trainer(model, "equal", bundle, steps=4, eval_every=2, batch_size=8, device="cpu", progress=False).fit()
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, result.weights[k])
    with pytest.raises(ValueError, match="model_fn"):
        Trainer(model, "stl", bundle, steps=1, device="cpu", progress=False)
    Trainer(model, "stl", bundle, steps=1, device="cpu", progress=False, warm_start=True)


# ------------------------------------------------------------------ results out
def test_predict_applies_the_eval_transform_without_grad_and_restores_nothing_else():
    bundle = _bundle()
    bundle.eval_transform = lambda x: x * 0.0  # every input the same after the transform
    result = Trainer(_model_fn, "stl", bundle, steps=2, batch_size=8, device="cpu", progress=False).fit()
    out = result.predict(np.random.default_rng(1).normal(size=(7, 4)))
    assert out.shape == (7, 3) and not out.requires_grad
    assert torch.allclose(out, out[:1].expand(7, 3))  # the transform was applied


def test_save_then_load_gives_the_same_predictions_phi_and_history(tmp_path):
    bundle = _bundle()
    # MAOAL's own run (the guard, on by default, may keep STL's run, which has no φ)
    result = Trainer(_model_fn, MAOAL(fallback=None), bundle, steps=4, eval_every=2, batch_size=8, device="cpu",
                     progress=False).fit()
    path = result.save(tmp_path / "run.pt")
    torch.load(path, weights_only=True)  # nothing but tensors and plain values
    loaded = RunResult.load(path, _model_fn)
    x = torch.randn(5, 4)
    assert torch.equal(loaded.predict(x), result.predict(x))
    assert loaded.tasks.names == TASKS.names and loaded.val_metric == result.val_metric
    assert torch.equal(loaded.phi["hparams"][0], result.phi["hparams"][0])
    pd.testing.assert_frame_equal(loaded.history, result.history, check_dtype=False)
    assert loaded.trace[-1]["importance"] == result.trace[-1]["importance"]


# ------------------------------------------------------------------ aux_losses everywhere
def _terms(model):
    x, y, a = _numpy_data(8)
    batch = {"primary": (torch.tensor(x, dtype=torch.float32), {"y": torch.tensor(y), "a": torch.tensor(a)})}
    return compute_terms(model, batch, TASKS)


def _setup(method, model):
    from auxnb.methods import SetupInfo

    method.setup(model, SetupInfo(tasks=TASKS, device=torch.device("cpu"), num_train=8, seed=0))
    return method


@pytest.mark.parametrize("cls", [Equal, STL, GCS])
def test_aux_losses_add_their_hand_computed_gradient_to_any_method(cls):
    torch.manual_seed(0)
    model = _model_fn()
    params = [p for p in model.parameters()]
    head = model.heads["y"].weight
    # extra loss 3·Σ w over the primary head's weight: its gradient is 3 there, 0 elsewhere;
    # with aux_loss_weight 0.5 and an L2 penalty on the same weight (grad 2·0.1·w) on top
    extra = {"lin": lambda m, t: 3.0 * m.heads["y"].weight.sum(), "l2": l2_penalty("heads.y.weight", scale=0.1)}
    plain = _setup(cls(), model).direction(_terms(model), params)
    with_extra = _setup(cls(aux_losses=extra, aux_loss_weight=0.5), model).direction(_terms(model), params)
    for p, g0, g1 in zip(params, plain, with_extra):
        expected = g0 + (0.5 * (3.0 + 2 * 0.1 * head.detach()) if p is head else 0.0)
        assert torch.allclose(g1, expected, atol=1e-6)
    assert cls(aux_losses=extra).config()["aux_losses"] == ["lin", "l2"]


def test_aux_losses_enter_a_bilevel_methods_graph_carrying_direction():
    from auxnb.methods import JTDS

    method = JTDS(aux_losses={"lin": lambda m, t: 2.0 * m.heads["a"].bias.sum()})
    assert method.aux_losses == ["lin"] and method._extra_losses


# ------------------------------------------------------------------ plots
@pytest.mark.parametrize("method", ["maoal", "jtds", "n-jtds", "auxl", "dtg", "auto-mix", "maxl"])
def test_what_every_bilevel_method_learned_can_be_plotted(method):
    pytest.importorskip("seaborn")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from auxnb import experiments, plot

    result = experiments.run("digits-rotation", method, scale="smoke", progress=False, device="cpu", steps=4,
                             eval_every=2)
    frame = plot.learned_frame(result)
    assert not frame.empty and set(frame["step"]) == {2, 4}
    ax = plot.task_weights(result)
    assert ax.get_xlabel() == "lower step" and ax.lines
    ax = plot.weight_distribution(result)
    assert ax.get_title()
    plt.close("all")


# ------------------------------------------------------------------ optional dependencies
def test_missing_plot_libraries_give_the_install_hint():
    import subprocess
    import sys

    code = (
        "import importlib.util as u\n"
        "orig = u.find_spec\n"
        "u.find_spec = lambda name, *a: None if name == 'seaborn' else orig(name, *a)\n"
        "try:\n    import auxnb.plot\n"
        "except ImportError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'pip install "auxnb[plot]"' in out.stdout and "seaborn" in out.stdout


def test_missing_ipywidgets_gives_the_install_hint(monkeypatch):
    import sys

    from auxnb import widgets

    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(ImportError, match=r'pip install "auxnb\[plot\]"'):
        widgets.importance_slider(None)


def test_from_numpy_copies_its_inputs_so_a_later_change_or_a_read_only_array_cannot_reach_the_dataset():
    import warnings

    import numpy as np

    from auxnb.data import TaskDataset

    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    ds = TaskDataset.from_numpy(x, {"y": np.arange(6) % 2})
    x[:] = -1.0  # the user's array changes after the dataset was made
    assert ds.inputs.tolist() == np.arange(12, dtype=np.float32).reshape(6, 2).tolist()
    frozen = np.arange(12, dtype=np.int64).reshape(6, 2)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a non-writable array
        ds = TaskDataset.from_numpy(frozen, {"y": np.arange(6) % 2})
    ds.inputs[0, 0] = 99  # the dataset's own memory: the read-only array is untouched
    assert int(frozen[0, 0]) == 0 and ds.inputs.dtype == torch.int64
