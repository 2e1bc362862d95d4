"""Loading data never runs code: a pickle planted in a data folder is refused, and never executes.

Each test plants a pickle whose unpickling would create a marker file (through ``os.system`` or
``builtins.exec``), then loads the folder through the API and the command line; the marker must
never appear and the error must name the file and say how to fix it.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from auxnb.__main__ import main
from auxnb.data.cifar import _CIFAR_GLOBALS, load_cifar10, load_cifar100
from auxnb.data.fixtures import write_cifar10, write_cifar100


class _System:
    """Unpickling this calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    """Unpickling this calls ``exec(source)``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


def _payloads(marker: Path) -> dict[str, object]:
    touch = f"touch {marker}"
    write = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "os-system-top": _System(touch),
        "exec-top": _Exec(write),
        # a valid-looking batch whose 'labels' value runs code: the global sits mid-stream
        "exec-in-batch": {b"batch_label": b"x", b"labels": _Exec(write), b"data": np.zeros((1, 3072), np.uint8)},
    }


def _plant(path: Path, payload: object) -> None:
    path.write_bytes(pickle.dumps(payload, protocol=2))


@pytest.mark.parametrize("kind", ["os-system-top", "exec-top", "exec-in-batch"])
@pytest.mark.parametrize("target", ["batches.meta", "data_batch_3", "test_batch"])
def test_load_cifar10_refuses_a_code_running_pickle_and_never_runs_it(tmp_path, kind, target):
    marker = tmp_path / "marker"
    write_cifar10(tmp_path / "data")
    bad = tmp_path / "data" / "cifar-10-batches-py" / target
    _plant(bad, _payloads(marker)[kind])
    split = "test" if target == "test_batch" else "train"
    with pytest.raises(ValueError) as info:
        load_cifar10(tmp_path / "data", split)
    assert not marker.exists(), "the planted pickle ran code"
    assert str(bad) in str(info.value) and "not loaded" in str(info.value) and "official archive" in str(info.value)


@pytest.mark.parametrize("target", ["meta", "train"])
def test_load_cifar100_refuses_a_code_running_pickle_and_never_runs_it(tmp_path, target):
    marker = tmp_path / "marker"
    write_cifar100(tmp_path / "data", train_per_class=1, test_per_class=1)
    bad = tmp_path / "data" / "cifar-100-python" / target
    _plant(bad, _payloads(marker)["os-system-top"])
    with pytest.raises(ValueError, match="official archive") as info:
        load_cifar100(tmp_path / "data", "train")
    assert not marker.exists()
    assert str(bad) in str(info.value)


def test_the_admitted_globals_are_exactly_those_a_cifar_batch_references(tmp_path):
    # the fixture writer pickles exactly as the archives do (protocol 2, numpy arrays, bytes)
    write_cifar10(tmp_path, train_per_class=1, test_per_class=1)
    write_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    seen = set()
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            for op, arg, _ in pickletools.genops(path.read_bytes()):
                if op.name == "GLOBAL":
                    seen.add(tuple(arg.split(" ")))
    assert seen <= set(_CIFAR_GLOBALS)
    # every admitted global is one of: array reconstruction (two numpy module names), ndarray, dtype, bytes
    assert {name for _, name in _CIFAR_GLOBALS} == {"_reconstruct", "ndarray", "dtype", "encode"}


def test_a_batch_written_with_numpy_1_module_names_still_loads(tmp_path):
    # the official archives (Python 2, numpy 1) name numpy.core.multiarray, not numpy._core
    truth = write_cifar10(tmp_path, train_per_class=1, test_per_class=1)
    folder = truth["folder"]
    for path in folder.iterdir():
        path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    test = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(test.images.numpy().reshape(len(test), -1), truth["test_images"].reshape(len(test), -1))
    np.testing.assert_array_equal(test.labels.numpy(), truth["test_labels"])


def test_codecs_encode_is_admitted_only_for_latin1(tmp_path):
    write_cifar10(tmp_path, train_per_class=1, test_per_class=1)
    bad = tmp_path / "cifar-10-batches-py" / "batches.meta"
    # GLOBAL _codecs.encode applied to ('x', 'rot13'): a codec other than the one bytes use
    bad.write_bytes(b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(ValueError, match="latin1") as info:
        load_cifar10(tmp_path, "train")
    assert str(bad) in str(info.value)


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """$AUXNB_DATA with real-layout CIFAR-10 whose data_batch_2 runs code when unpickled."""
    marker = tmp_path / "marker"
    data = tmp_path / "data"
    write_cifar10(data, train_per_class=2, test_per_class=1)
    bad = data / "cifar-10-batches-py" / "data_batch_2"
    _plant(bad, _payloads(marker)["exec-in-batch"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUXNB_DATA", str(data))
    monkeypatch.setenv("AUXNB_DEVICE", "cpu")
    return marker, bad


@pytest.mark.parametrize("argv", [
    ["run", "cifar10-rotation", "--scale", "small", "--no-progress", "--set", "steps=1"],
    ["sweep", "cifar10-rotation", "--scale", "small", "--methods", "stl", "--seeds", "0", "--out", "out.csv", "--no-progress", "--set", "steps=1"],
    ["plan", "--settings", "cifar10-rotation", "--methods", "stl", "--scale", "small", "--seeds", "1", "--probe-steps", "1"],
], ids=["run", "sweep", "plan"])
def test_cli_never_runs_code_from_the_data_folder(planted, argv, capsys):
    marker, bad = planted
    code = main(argv)
    captured = capsys.readouterr()
    assert not marker.exists(), "the planted pickle ran code"
    assert "Traceback" not in captured.err
    if argv[0] == "plan":  # plan only checks that the files are there; it reads none of them
        assert code == 0
        return
    text = captured.out + captured.err + (Path("out.csv").read_text() if Path("out.csv").exists() else "")
    assert str(bad) in text and "not loaded" in text


def test_cli_run_in_a_fresh_interpreter_never_runs_code_from_the_data_folder(planted):
    marker, bad = planted
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "auxnb", "run", "cifar10-rotation", "--scale", "small", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert not marker.exists()
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_no_loader_in_the_package_can_unpickle_code():
    # the audit, kept: every torch.load passes weights_only=True, every np.load allow_pickle=False,
    # and the only pickle reader is the restricted CIFAR unpickler
    import re

    package = Path(__file__).resolve().parents[1] / "auxnb"
    offenders = []
    for path in package.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{number}")
            if re.search(r"\b(np|numpy)\.load\(", code) and "allow_pickle=False" not in code:
                offenders.append(f"{path.name}:{number}")
            if re.search(r"\bpickle\.(load|loads)\(|\bpd\.read_pickle\(|\bpickle\.Unpickler\(", code):
                offenders.append(f"{path.name}:{number}")
    assert offenders == []
