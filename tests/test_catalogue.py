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


# ------------------------------------------------------------------ issue 25: data at the door
FRAME = pd.DataFrame(X, columns=["f0", "f1", "f2", "f3"]).assign(y=Y, a=A)
INT_FRAME = pd.DataFrame(RNG.integers(0, 5, size=(80, 4)), columns=["f0", "f1", "f2", "f3"]).assign(y=Y, a=A)


def _frame_result():
    data = build_bundle(TaskDataset.from_pandas(FRAME, targets=["y", "a"]), TASKS, val_size=10, test_size=10, dev_size=6, seed=0)
    return _train(data=data, steps=2).fit()


def _int_table_trainer():
    data = build_bundle(TaskDataset.from_pandas(INT_FRAME, targets=["y", "a"]), TASKS, val_size=10, test_size=10, dev_size=6, seed=0)
    return _train(data=data)  # the float MLP meets int64 field ids


def _with_env(key, value, fn):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(key)
        else:
            os.environ[key] = old


def _mps_trainer():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    return _train(device="mps")


API_CASES += [
    ("predict-frame-missing-column", lambda: _frame_result().predict(FRAME[["f0", "f1", "f2"]]), ValueError, ["missing column(s) ['f3']", "add the missing"]),
    ("predict-frame-extra-column", lambda: _frame_result().predict(FRAME[["f0", "f1", "f2", "f3", "y"]]), ValueError, ["['y'] that training did not use", "frame.drop(columns=['y'])"]),
    ("predict-frame-renamed-column", lambda: _frame_result().predict(FRAME[["f0", "f1", "f2", "f3"]].rename(columns={"f2": "F2"})),
     ValueError, ["missing column(s) ['f2']", "['F2'] that training did not use"]),
    ("predict-frame-duplicate-column", lambda: _frame_result().predict(pd.concat([FRAME[["f0", "f1", "f2", "f3"]], FRAME[["f0"]]], axis=1)),
     ValueError, ["duplicate column name(s) ['f0']", "once"]),
    ("predict-frame-on-array-model", lambda: _stl_result().predict(FRAME[["f0", "f1", "f2", "f3"]]), TypeError, ["trained on arrays", "to_numpy()"]),
    ("predict-array-too-wide", lambda: _stl_result().predict(np.zeros((3, 6))), ValueError, ["shape [6]", "trained on [4]"]),
    ("predict-array-too-narrow", lambda: _frame_result().predict(X[:, :3]), ValueError, ["shape [3]", "trained on [4]", "4 columns"]),
    ("predict-tensor-wrong-rank", lambda: _stl_result().predict(torch.zeros(3, 2, 2)), ValueError, ["shape [2, 2]", "[N, 4]"]),
    ("predict-int-array-on-float-model", lambda: _stl_result().predict(np.ones((3, 4), dtype=np.int64)), TypeError, ["int64", "astype(np.float32)"]),
    ("int-table-into-float-model", _int_table_trainer, ValueError, ["int64", "astype(float)", "field ids"]),
    ("wrap-int-example", lambda: MultiHeadModel.wrap(nn.Linear(4, 3), TASKS, torch.zeros(2, 4, dtype=torch.long)), ValueError, ["int64", "astype(float)"]),
    ("device-mps-unavailable", _mps_trainer, RuntimeError, ["'mps'", "device='cpu'"]),
    ("device-mps-resolve", lambda: resolve_device("mps") if not torch.backends.mps.is_available() else pytest.skip("MPS here"), RuntimeError, ["'mps'", "--device cpu"]),
    ("threads-negative", lambda: _train(threads=-1), ValueError, ["threads", ">= 0"]),
    ("threads-float", lambda: _train(threads=1.5), TypeError, ["threads", "int >= 0"]),
    ("threads-bool", lambda: _train(threads=True), TypeError, ["threads", "threads=1"]),
    ("threads-string", lambda: _train(threads="2"), TypeError, ["string '2'", "threads=2"]),
    ("threads-env-word", lambda: _with_env("AUXNB_THREADS", "two", _train), ValueError, ["AUXNB_THREADS='two'", "AUXNB_THREADS=1"]),
    ("threads-env-negative", lambda: _with_env("AUXNB_THREADS", "-3", _train), ValueError, ["AUXNB_THREADS", ">= 0"]),
    ("shots-dev-takes-every-shot", lambda: _bundle(shots=2, dev_size=20, val_size=5, test_size=5), ValueError,
     ["2-shot keeps 20", "takes all 20", "dev_size <= 10"]),
    ("one-shot-with-dev", lambda: _bundle(shots=1, dev_size=10, val_size=5, test_size=5), ValueError, ["1-shot", "shots >= 2", "dev_size=0"]),
    ("label-fraction-dev-takes-all", lambda: _bundle(label_fraction=0.2, dev_size=12), ValueError, ["takes all 12", "dev_size < 12", "label_fraction"]),
    ("task-metric-unknown", lambda: Task("y", "binary", metric="f1"), ValueError, ["'f1'", "use one of"]),
    ("task-metric-wrong-kind", lambda: Task("y", "classification", 10, metric="auc"), ValueError, ["'auc' does not apply", "['accuracy']"]),
    ("task-metric-accuracy-regression", lambda: Task("y", "regression", metric="accuracy"), ValueError, ["regression", "'rmse', 'mae'"]),
    ("task-metric-disagree", lambda: Task("y", "binary", metric="auc", metric_name="logloss"), ValueError, ["disagree", "give one"]),
    ("task-unknown-keyword", lambda: Task("y", "binary", metrics="auc"), TypeError, ["metrics"]),
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
    ("threads-negative", ["run", "digits-rotation", "--threads", "-1"], [">= 0", "torch's default"]),
    ("threads-word", ["run", "digits-rotation", "--threads", "two"], ["'two'", "--threads=1"]),
    ("threads-sweep-fraction", ["sweep", "digits-rotation", "--threads", "0.5"], ["'0.5'", "whole number"]),
    ("device-mps", ["run", "digits-rotation", "--scale", "smoke", "--device", "mps"], ["'mps'", "--device cpu"]),
    ("plan-device-mps", ["plan", "--settings", "digits-rotation", "--methods", "stl", "--device", "mps"], ["'mps'", "--device cpu"]),
    ("shots-dev-eats-shots", ["run", "digits-rotation", "--scale", "smoke", "--set", "shots=2", "--set", "dev_size=20", "--no-progress"],
     ["takes all 20", "dev_size <= 10", "--set dev_size=N"]),
    ("fixture-one-shot-dev", ["run", "fashion-rotation", "--scale", "smoke", "--set", "shots=1", "--no-progress"],
     ["1-shot", "takes all", "shots >= 2"]),
    ("set-shots-word", ["run", "digits-rotation", "--set", "shots=five"], ["shots", "int"]),
    ("plan-no-table", ["plan"], ["paper table id", "--settings"]),
    ("sweep-settings-empty", ["sweep", ","], ["settings is empty", "comma-separated"]),
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


def test_cli_bad_threads_environment_variable_is_one_error_line(sandbox, capsys, monkeypatch):
    monkeypatch.setenv("AUXNB_THREADS", "many")
    assert main(["run", "digits-rotation", "--scale", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "AUXNB_THREADS='many'" in err and "AUXNB_THREADS=1" in err


def test_a_target_left_among_the_inputs_is_warned_by_name_and_as_a_renamed_copy():
    from auxnb.checks import TargetAmongInputsWarning

    with pytest.warns(TargetAmongInputsWarning, match=r"\['y'\] hold the target 'y'"):
        TaskDataset.from_pandas(FRAME, targets="y", inputs=["f0", "f1", "y"])
    with pytest.warns(TargetAmongInputsWarning, match=r"\['leak'\] hold the target 'y'.*frame.drop"):
        TaskDataset.from_pandas(FRAME.assign(leak=FRAME["y"]), targets={"y": "y"}, inputs=["f0", "leak"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default inputs leave the targets out: no warning
        TaskDataset.from_pandas(FRAME, targets=["y", "a"])


def test_the_catalogue_has_at_least_60_cases():
    assert len(API_CASES) + len(CLI_CASES) + 5 >= 60


def test_predict_matches_dataframe_columns_by_name_whatever_their_order():
    result = _frame_result()
    frame = FRAME[["f0", "f1", "f2", "f3"]]
    expected = result.predict(X.astype(np.float32))  # the training order, as an array
    shuffled = frame[["f3", "f1", "f0", "f2"]]
    torch.testing.assert_close(result.predict(shuffled), expected, rtol=0, atol=0)
    torch.testing.assert_close(result.predict(frame), expected, rtol=0, atol=0)


def test_predict_checks_survive_save_and_load(tmp_path):
    result = _frame_result()
    path = result.save(tmp_path / "run.pt")
    loaded = RunResult.load(path, model=_model())
    with pytest.raises(ValueError, match=r"missing column\(s\) \['f3'\]"):
        loaded.predict(FRAME[["f0", "f1", "f2"]])
    torch.testing.assert_close(loaded.predict(FRAME[["f3", "f2", "f1", "f0"]]), result.predict(X.astype(np.float32)))


def test_an_integer_table_stays_integer_field_ids_as_documented():
    ds = TaskDataset.from_pandas(INT_FRAME, targets=["y", "a"])
    assert ds.inputs.dtype == torch.int64  # the stated rule: all-integer inputs are field ids
    assert torch.equal(ds.inputs, torch.as_tensor(INT_FRAME[["f0", "f1", "f2", "f3"]].to_numpy(copy=True)))
    as_float = TaskDataset.from_pandas(INT_FRAME.astype({c: float for c in ["f0", "f1", "f2", "f3"]}), targets=["y", "a"])
    assert as_float.inputs.dtype == torch.float32  # the fix the error names


def test_task_metric_keyword_sets_the_metric_used_for_selection():
    from auxnb.tasks import metric

    t = Task("y", "regression", metric="mae")
    assert t.metric == "mae" and t.metric_name == "mae" and not t.higher_is_better
    # mae of (0, 2) against (1, 1) is 1; rmse would also be 1, so use (0, 3) against (1, 1): mae 1.5, rmse sqrt(2.5)
    value = metric(t, torch.tensor([0.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert value == pytest.approx(1.5)
    assert Task("y", "regression", metric_name="mae") == t
