"""Checkpoint integrity: a damaged, non-finite or incomplete checkpoint is refused, never resumed from.

Bits are flipped inside the stored bytes of one tensor of each part of a real mid-run checkpoint
(model, optimiser, method state, random state); the zip CRC-32s and the payload checksum are
independent truths that the bytes changed.
"""

from __future__ import annotations

import errno
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import fit  # noqa: E402

from auxnb import checkpoint as ckpt_io  # noqa: E402
from auxnb.checkpoint import CheckpointError  # noqa: E402

from auxnb.methods import get  # noqa: E402


def _fit(**kw):
    # MAOAL without its do-no-harm guard has tensors in every part: weights, Adam moments, its
    # hyper-parameters, random states
    return fit(method=get("maoal", fallback=None), **kw)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _part_tensor(raw: dict, part: str) -> torch.Tensor:
    if part == "model":
        return next(v for v in raw["model"].values() if v.is_floating_point() and v.numel() > 4)
    if part == "optimizer":
        return raw["optimizer"]["state"][0]["exp_avg"]
    if part == "method":
        tensors = [v for v in raw["method"]["hparams"] if isinstance(v, torch.Tensor)] + [raw["method"]["reach"]]
        return next(t for t in tensors if t.numel())
    if part == "rng":
        return raw["rng"]["torch"]
    raise AssertionError(part)


def _entry_span(path: Path, data: bytes) -> tuple[str, int, int]:
    """The zip entry whose stored bytes are exactly `data`: (name, first byte in the file, length)."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type == zipfile.ZIP_STORED and info.file_size == len(data) and archive.read(info) == data:
                name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
                return info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size
    raise AssertionError("tensor storage not found as its own zip entry")


def _flip(path: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    _fit(checkpoint_dir=folder)
    path = folder / "checkpoint.pt"
    return folder, path, path.read_bytes()


@pytest.mark.parametrize("part", ["model", "optimizer", "method", "rng"])
def test_one_flipped_bit_in_each_part_is_refused_naming_the_file_and_remedy(made, part, tmp_path):
    folder, original, content = made
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    raw = torch.load(path, weights_only=True)
    name, start, size = _entry_span(path, _tensor_bytes(_part_tensor(raw, part)))
    _flip(path, start + size // 2)
    assert path.read_bytes() != content
    with pytest.raises(CheckpointError) as err:
        _fit(checkpoint_dir=tmp_path, resume=True)
    message = str(err.value)
    assert str(path) in message and "damaged" in message and name in message and "delete it" in message


def test_the_payload_checksum_catches_a_change_whose_zip_crcs_were_rewritten(made, tmp_path):
    # a tool that rewrites the archive (fresh CRCs) around a changed tensor: only the checksum sees it
    _, _, content = made
    source = tmp_path / "source.pt"
    source.write_bytes(content)
    raw = torch.load(source, weights_only=True)
    target = _tensor_bytes(_part_tensor(raw, "model"))
    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if data == target:
                data = bytes([data[0] ^ 1]) + data[1:]
            dst.writestr(info.filename, data)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC agrees with its (changed) bytes
    with pytest.raises(CheckpointError, match="do not match the checksum") as err:
        ckpt_io.load(path)
    assert str(path) in str(err.value)


def test_the_payload_digest_changes_with_any_single_bit_of_a_tensor_and_not_otherwise():
    base = {"a": torch.arange(8, dtype=torch.float32), "b": [1, 2.5, "x", None], "c": {"d": torch.zeros(3, dtype=torch.int64)}}
    reference = ckpt_io.payload_digest(base)
    assert ckpt_io.payload_digest({k: v for k, v in base.items()}) == reference
    for bit in range(32):
        changed = base["a"].clone()
        changed.view(torch.int32)[5] ^= 1 << bit
        assert ckpt_io.payload_digest({**base, "a": changed}) != reference
    assert ckpt_io.payload_digest({**base, "b": [1, 2.5000000000000004, "x", None]}) != reference
    assert ckpt_io.payload_digest({**base, "a": base["a"].reshape(2, 4)}) != reference  # shape counts
    assert ckpt_io.payload_digest({**base, "a": base["a"].double()}) != reference  # dtype counts


@pytest.mark.parametrize("where", ["model", "best"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_entry(made, tmp_path, where, value):
    _, _, content = made
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    payload = dict(ckpt_io.load(path))
    payload.pop("format")
    weights = payload["model"] if where == "model" else payload["state"]["best"]
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = value
    ckpt_io.save(path, payload)
    with pytest.raises(CheckpointError) as err:
        _fit(checkpoint_dir=tmp_path, resume=True)
    message = str(err.value)
    assert str(path) in message and name in message and "NaN/Inf" in message and "delete it" in message


@pytest.mark.parametrize("entry", ["model", "optimizer", "method", "rng", "state"])
def test_a_missing_entry_is_refused_naming_the_entry_and_the_file(made, tmp_path, entry):
    _, _, content = made
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    payload = dict(ckpt_io.load(path))
    payload.pop("format")
    payload.pop(entry)
    ckpt_io.save(path, payload)
    with pytest.raises(CheckpointError) as err:
        _fit(checkpoint_dir=tmp_path, resume=True)
    assert repr(entry) in str(err.value) and str(path) in str(err.value)


def test_an_intact_checkpoint_is_accepted_and_gives_the_uninterrupted_result(made, tmp_path):
    # the control for the refusals above (mid-run resumes are tested bit for bit in test_faults.py)
    _, _, content = made
    whole = _fit()
    (tmp_path / "checkpoint.pt").write_bytes(content)
    resumed = _fit(checkpoint_dir=tmp_path, resume=True)
    assert resumed.val_metric == whole.val_metric and resumed.test_metric == whole.test_metric


# --------------------------------------------------------------------------- writers
def test_a_full_disk_says_disk_full_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    class _Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])  # half of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def full_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return _Full(fh) if "w" in mode and str(file).endswith(".tmp") else fh

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(OSError) as err:
        ckpt_io.save(tmp_path / "checkpoint.pt", {"model": {"w": torch.ones(100)}})
    assert "Disk full" in str(err.value) and str(tmp_path / "checkpoint.pt") in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_temporary_names_are_unique_per_writer_and_beside_the_target(tmp_path):
    names = {ckpt_io.temporary_name(tmp_path / "checkpoint.pt") for _ in range(200)}
    assert len(names) == 200
    import os

    assert all(n.parent == tmp_path and n.name.startswith(f"checkpoint.pt.{os.getpid()}.") and n.name.endswith(".tmp") for n in names)


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that has exited (reaped): no such process now
    stale = tmp_path / f"checkpoint.pt.{dead.pid}.abcd1234.tmp"
    live = tmp_path / f"checkpoint.pt.{os.getpid()}.abcd1234.tmp"
    other = tmp_path / "notes.txt.1.x.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    ckpt_io.save(tmp_path / "checkpoint.pt", {"v": 1})
    assert not stale.exists() and live.exists() and other.exists()


def test_a_damaged_image_cache_is_rebuilt_to_the_same_images(tmp_path):
    from auxnb.data.cub import load_cub
    from auxnb.data.fixtures import write_cub

    write_cub(tmp_path, num_classes=2, train_per_class=2, test_per_class=1)
    first = load_cub(tmp_path, image_size=16, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("cub-16-*.pt")
    cache.write_bytes(cache.read_bytes()[:100])  # cut short
    again = load_cub(tmp_path, image_size=16, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, again.images)
    assert torch.equal(torch.load(cache, weights_only=True), first.images)  # and the cache is whole again
