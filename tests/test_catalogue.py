"""The reliability catalogue: bad inputs across the API and the command line.

Each case must fail before any work with an error that names the problem and the fix (the
words checked below), never a traceback on the command line, and must change nothing on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from auxnb import MultiHeadModel, RunResult, Task, TaskDataset, TaskSet, Trainer
from auxnb.__main__ import main
from auxnb.data import build_bundle
from auxnb.models import make_head
from auxnb.train import resolve_device

TASKS = TaskSet([Task("y", "classification", 10, primary=True), Task("a", "classification", 2)])
RNG = np.random.default_rng(0)
X = RNG.normal(size=(80, 4))
Y = RNG.integers(0, 10, 80)
A = RNG.integers(0, 2, 80)


def _bundle(**kw):
    args = dict(val_size=10, test_size=10, dev_size=6, seed=0)
    args.update(kw)
    return build_bundle(TaskDataset.from_numpy(X, {"y": Y, "a": A}), TASKS, **args)


BUNDLE = _bundle()


def _model(y_out=10):
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    return MultiHeadModel(backbone, {"y": make_head(8, y_out), "a": make_head(8, 2)})


def _train(**kw):
    args = dict(steps=2, device="cpu", progress=False)
    args.update(kw)
    model = args.pop("model", None) or _model()
    data = args.pop("data", BUNDLE)
    return Trainer(model, "stl", data, **args)


class _Items(Dataset):
    def __init__(self, item):
        self.item = item

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return self.item


class _TensorOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 10)

    def forward(self, x, tasks=None):
        return self.lin(x)


def _fitted_model():
    model = _model()
    _train(model=model, steps=1).fit()
    return model


def _not_a_results_file(tmp):
    path = Path(tmp) / "other.pt"
    torch.save([1, 2, 3], path)
    return path


def _stl_result():
    return _train(steps=2).fit()


# (id, callable, expected exception, words the message must contain: problem and fix)
API_CASES = [
    ("numpy-inputs", lambda: TaskDataset(X, {"y": torch.tensor(Y)}), TypeError, ["ndarray", "from_numpy"]),
    ("numpy-targets", lambda: TaskDataset(torch.zeros(80, 4), {"y": Y}), TypeError, ["Target 'y'", "from_numpy"]),
    ("dataframe-inputs", lambda: TaskDataset(pd.DataFrame(X), {}), TypeError, ["DataFrame", "from_pandas"]),
    ("targets-not-dict", lambda: TaskDataset.from_numpy(X, Y), TypeError, ["dict", "{'label': y}"]),
    ("object-inputs", lambda: TaskDataset.from_numpy(np.array([[1, "a"]], dtype=object), {"y": [0]}), TypeError, ["object", "numeric"]),
    ("text-inputs", lambda: TaskDataset.from_numpy(np.array([["a"]]), {"y": [0]}), TypeError, ["dtype", "numbers"]),
    ("fractional-class", lambda: TaskDataset.from_numpy(X[:2], {"y": [0.5, 1.0]}, tasks=TASKS), ValueError, ["fractional", "class ids"]),
    ("pandas-not-frame", lambda: TaskDataset.from_pandas(X, targets="y"), TypeError, ["DataFrame", "from_numpy"]),
    ("pandas-missing-col", lambda: TaskDataset.from_pandas(pd.DataFrame({"f": [1.0]}), targets="y"), KeyError, ["'y'", "columns are"]),
    ("pandas-text-col", lambda: TaskDataset.from_pandas(pd.DataFrame({"f": ["u"], "y": [1]}), targets="y"), TypeError, ["'f'", "category"]),
    ("dataset-not-mapstyle", lambda: TaskDataset.from_dataset(5), TypeError, ["map-style", "from_numpy"]),
    ("dataset-item-form", lambda: TaskDataset.from_dataset(_Items(torch.zeros(2))), TypeError, ["(x, y)", "Item 0"]),
    ("dataset-label-count", lambda: TaskDataset.from_dataset(_Items((torch.zeros(2), 1, 0)), "y"), ValueError, ["2 label", "one name per label"]),
    ("bundle-source-list", lambda: build_bundle([1, 2], TASKS, val_size=1, test_size=1, dev_size=0), TypeError, ["Accepted", "from_numpy"]),
    ("epochs-0", lambda: _train(steps=None, epochs=0), ValueError, ["epochs", ">= 1"]),
    ("steps-negative", lambda: _train(steps=-1), ValueError, ["steps", ">= 1"]),
    ("no-epochs-no-steps", lambda: _train(steps=None, epochs=None), ValueError, ["epochs", "steps"]),
    ("batch-size-str", lambda: _train(batch_size="64"), TypeError, ["batch_size", "positive int"]),
    ("lr-str", lambda: _train(lr="x"), TypeError, ["lr", "finite number"]),
    ("lr-zero", lambda: _train(lr=0.0), ValueError, ["lr", "> 0"]),
    ("optimizer-unknown", lambda: _train(optimizer="adamm"), ValueError, ["adamm", "'sgd'"]),
    ("grad-clip-negative", lambda: _train(grad_clip=-1.0), ValueError, ["grad_clip", "reverse"]),
    ("eval-every-0", lambda: _train(eval_every=0), ValueError, ["eval_every", ">= 1"]),
    ("seed-negative", lambda: _train(seed=-1), ValueError, ["seed", "2**63-1"]),
    ("seed-too-big", lambda: _train(seed=2**63), ValueError, ["seed", "2**63-1"]),
    ("seed-float", lambda: _train(seed=1.5), TypeError, ["seed", "int"]),
    ("val-empty", lambda: _train(data=_bundle(val_size=0)), ValueError, ["validation split", "val_size"]),
    ("test-empty", lambda: _train(data=_bundle().__class__(**{**_bundle().__dict__, "test": BUNDLE.test.subset(slice(0, 0))})),
     ValueError, ["test split is empty", "test=None"]),
    ("data-not-bundle", lambda: Trainer(_model(), "stl", TaskDataset.from_numpy(X, {"y": Y}), steps=1, device="cpu"), TypeError, ["DataBundle", "build_bundle"]),
    ("head-12-for-10", lambda: _train(model=_model(12)), ValueError, ["[2, 12]", "10 outputs"]),
    ("head-5-for-10", lambda: _train(model=_model(5)), ValueError, ["[2, 5]", "10 outputs"]),
    ("model-returns-tensor", lambda: _train(model=_TensorOnly()), TypeError, ["returned a Tensor", "MultiHeadModel.wrap"]),
    ("model-bad-arity", lambda: _train(model=nn.Linear(4, 10)), TypeError, ["model(x,", "contract"]),
    ("float64-tensor-inputs", lambda: _train(data=build_bundle(TaskDataset(torch.tensor(X), {"y": torch.tensor(Y), "a": torch.tensor(A)}), TASKS, val_size=10, test_size=10, dev_size=0)),
     TypeError, ["float64", "x.float()"]),
    ("model-already-fitted", lambda: _train(model=_fitted_model()), ValueError, ["already trained", "model_fn"]),
    ("model-fn-not-module", lambda: _train(model=lambda: 3), TypeError, ["model_fn", "nn.Module"]),
    ("model-not-module", lambda: _train(model="resnet"), TypeError, ["nn.Module", "model_fn"]),
    ("wrap-no-example", lambda: MultiHeadModel.wrap(nn.Linear(4, 3), TASKS), ValueError, ["out_features", "x[:2]"]),
    ("wrap-4d-features", lambda: MultiHeadModel.wrap(nn.Conv2d(1, 2, 1), TASKS, torch.zeros(2, 1, 3, 3)), ValueError, ["[B, d]", "Flatten"]),
    ("load-missing", lambda: RunResult.load("nothing-here.pt"), FileNotFoundError, ["No results file", "save"]),
    ("predict-unknown-task", lambda: _stl_result().predict(X, task="zzz"), KeyError, ["zzz", "tasks are"]),
    ("aux-losses-list", lambda: __import__("auxnb").methods.Equal(aux_losses=["l2"]), TypeError, ["aux_losses", "dict"]),
    ("aux-losses-not-callable", lambda: __import__("auxnb").methods.STL(aux_losses={"l2": 3}), TypeError, ["'l2'", "callable"]),
    ("method-unknown", lambda: _train().__class__(_model(), "nope", BUNDLE, steps=1, device="cpu"), ValueError, ["nope", "valid methods"]),
    ("device-unknown", lambda: resolve_device("gpu"), ValueError, ["'gpu'", "'cpu'"]),
    ("save-missing-folder", lambda: _stl_result().save("no/such/folder/run.pt"), FileNotFoundError, ["does not exist", "create it"]),
    ("plot-stl-weights", lambda: __import__("auxnb.plot", fromlist=["x"]).task_weights(_stl_result()), ValueError, ["no learned weights", "maoal"]),
]


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """cwd and $AUXNB_DATA inside an empty folder whose listing must not change."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUXNB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("AUXNB_DEVICE", "cpu")
    before = _snapshot(tmp_path)
    yield tmp_path
    assert _snapshot(tmp_path) == before, "the bad input changed files on disk"


@pytest.mark.parametrize("case, fn, exc, words", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_names_problem_and_fix(case, fn, exc, words, sandbox):
    with pytest.raises(exc) as info:
        fn()
    message = info.value.args[0] if isinstance(info.value, KeyError) else str(info.value)
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"


def test_loading_a_file_that_is_not_a_result_says_so(tmp_path):
    path = _not_a_results_file(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="not a results file"):
        RunResult.load(path)
    assert _snapshot(tmp_path) == before


CLI_CASES = [
    ("seeds-countdown", ["sweep", "digits-rotation", "--seeds", "3-1"], ["counts down", "low-high"]),
    ("seeds-letters", ["sweep", "digits-rotation", "--seeds", "a-b"], ["'a-b'", "0-4"]),
    ("seeds-mixed-bad", ["sweep", "digits-rotation", "--seeds", "0-2,x"], ["'x'", "0-2,5"]),
    ("set-no-equals", ["run", "digits-rotation", "--set", "foo"], ["KEY=VALUE", "label_fraction=0.1"]),
    ("set-unknown-key", ["run", "digits-rotation", "--set", "nokey=1"], ["nokey", "valid keys"]),
    ("set-bad-float", ["run", "digits-rotation", "--set", "lr=x"], ["lr='x'", "expected float"]),
    ("set-epochs-0", ["run", "digits-rotation", "--set", "epochs=0"], ["epochs=0", ">= 1"]),
    ("set-grad-clip-neg", ["run", "digits-rotation", "--set", "grad_clip=-1"], ["grad_clip", ">= 0"]),
    ("set-val-size-0", ["run", "digits-rotation", "--scale", "smoke", "--set", "val_size=0", "--no-progress"], ["validation split", "val_size"]),
    ("setting-unknown", ["run", "nope"], ["'nope'", "valid settings"]),
    ("method-unknown", ["run", "digits-rotation", "--method", "nope"], ["'nope'", "valid methods"]),
    ("seed-negative", ["run", "digits-rotation", "--seed", "-1"], ["out of range", "2**63-1"]),
    ("resume-no-dir", ["run", "digits-rotation", "--resume"], ["--resume", "--checkpoint-dir"]),
    ("device-unknown", ["run", "digits-rotation", "--device", "gpu"], ["'gpu'", "'cpu'"]),
    ("out-missing-folder", ["sweep", "digits-rotation", "--out", "no/such/dir/x.csv"], ["does not exist", "create it"]),
    ("jobs-zero", ["sweep", "digits-rotation", "--jobs", "0"], ["not >= 1", "positive"]),
    ("methods-empty", ["sweep", "digits-rotation", "--methods", ","], ["--methods", "comma-separated"]),
]


@pytest.mark.parametrize("case, argv, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_error_line_without_traceback(case, argv, words, sandbox, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, f"{case}: exit status {code}"
    assert "Traceback" not in err and "error:" in err
    for word in words:
        assert word in err, f"{case}: {word!r} not in {err!r}"


def test_cli_bad_scale_environment_variable(sandbox, capsys, monkeypatch):
    monkeypatch.setenv("AUXNB_SCALE", "huge")
    assert main(["run", "digits-rotation"]) == 2
    err = capsys.readouterr().err
    assert "AUXNB_SCALE='huge'" in err and "smoke" in err


def test_cli_cuda_without_cuda(sandbox, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("AUXNB_DEVICE", "cuda")
    assert main(["run", "digits-rotation", "--scale", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err


def test_the_catalogue_has_at_least_40_cases():
    assert len(API_CASES) + len(CLI_CASES) + 3 >= 40
