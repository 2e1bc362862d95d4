"""Checkpoint files that cannot run code, cannot be mixed up, and resume a run bit for bit.

A checkpoint is written atomically and read with ``torch.load(..., weights_only=True)``: it holds
tensors and plain Python values only (numpy values are stored as tagged tensors and restored as
numpy). It carries the run's identity; resuming a different run from it is refused. Nothing here
trains, prints or touches the data pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

__all__ = [
    "CheckpointError", "FORMAT", "save", "load", "encode", "decode", "capture_rng", "restore_rng",
    "generator_states", "restore_generators", "split_hash", "identity_differences", "check_identity",
    "describe_value",
]

#: Format tag of auxnb checkpoints (bumped when the layout changes incompatibly).
FORMAT = "auxnb-checkpoint/1"

_ARRAY = "__auxnb_ndarray__"
_SCALAR = "__auxnb_npscalar__"
_OBJECT_ARRAY = "__auxnb_ndarray_list__"
_TUPLE = "__auxnb_tuple__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, from another run, or missing when required."""


# ----------------------------------------------------------------------------- encoding
def encode(value: Any) -> Any:
    """`value` with every numpy array / scalar replaced by a tagged tensor (plain Python otherwise).

    The result loads with ``torch.load(weights_only=True)``; `decode` restores the numpy values
    exactly (dtype and shape). Dicts, lists and tuples are walked; tensors pass through.

    Example:
        >>> decode(encode({"a": np.arange(3, dtype=np.int16), "b": np.float64(0.5)}))["a"].dtype
        dtype('int16')
    """
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biufc":
            return {_ARRAY: torch.from_numpy(np.ascontiguousarray(value).copy())}
        return {_OBJECT_ARRAY: encode(value.tolist()), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return {_SCALAR: torch.from_numpy(np.asarray(value).reshape(1).copy())}
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v) for v in value]}
    raise TypeError(
        f"Cannot store a {type(value).__name__} in a checkpoint (tensors, numpy values and plain Python only); "
        "convert it in the method's state_dict / trace."
    )


def decode(value: Any) -> Any:
    """Inverse of `encode`."""
    if isinstance(value, dict):
        if _ARRAY in value and len(value) == 1:
            return value[_ARRAY].numpy().copy()
        if _SCALAR in value and len(value) == 1:
            return value[_SCALAR].numpy()[0]
        if _TUPLE in value and len(value) == 1:
            return tuple(decode(v) for v in value[_TUPLE])
        if _OBJECT_ARRAY in value:
            out = np.array(decode(value[_OBJECT_ARRAY]), dtype=value["dtype"])
            return out.reshape(value["shape"])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


# ----------------------------------------------------------------------------- files
def save(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write `payload` (encoded) to `path` atomically: a killed writer never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(encode({"format": FORMAT, **payload}), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, *, remedy: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by `save` (``weights_only=True``: it cannot run code).

    Raises `CheckpointError` naming the file and what to do when it is empty, truncated, not a
    checkpoint, or holds anything but tensors and plain values.
    """
    path = Path(path)
    fix = remedy or f"delete it (or start fresh in another checkpoint directory) and run again"
    if path.is_dir():
        raise CheckpointError(f"Checkpoint {path} is a directory, not a file; {fix}.")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"No checkpoint at {path}; {fix}.") from None
    if size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes; a run killed while copying it?); {fix}.")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"Checkpoint {path} is not a complete checkpoint file ({size} bytes that are not a torch archive: "
            f"truncated, overwritten or not a checkpoint); {fix}."
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError, ... on bad files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds objects other than tensors and plain values, and is not loaded (it could run code)"
        raise CheckpointError(f"Checkpoint {path} cannot be read ({type(err).__name__}: {reason[:200]}); {fix}.") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(
            f"{path} is not an auxnb checkpoint of format {FORMAT!r} (found {found!r}; written by an older auxnb "
            f"or another program); {fix}."
        )
    return decode(raw)


# ----------------------------------------------------------------------------- random state
def capture_rng() -> dict[str, Any]:
    """The process-wide random states: torch CPU, every CUDA device (when initialised), numpy, random."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(legacy=False),
        "python": _plain_random_state(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng` (CUDA states are restored when CUDA is available here)."""
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = list(state["cuda"])
        for i in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[i], i)


def _plain_random_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def generator_states(owner: Any) -> dict[str, Any]:
    """Every random generator held as an attribute of `owner` (torch and numpy), by attribute name.

    Methods keep their own generators (partner permutations, MixUp's λ, DTG pairings); saving
    them by name means a method needs no code of its own to resume exactly.
    """
    out: dict[str, Any] = {}
    for name, value in sorted(vars(owner).items()):
        if isinstance(value, torch.Generator):
            out[name] = {"torch": value.get_state()}
        elif isinstance(value, np.random.Generator):
            out[name] = {"numpy": value.bit_generator.state}
        elif isinstance(value, np.random.RandomState):
            out[name] = {"numpy_legacy": value.get_state(legacy=False)}
    return out


def restore_generators(owner: Any, states: Mapping[str, Any]) -> None:
    """Inverse of `generator_states`; a generator saved but missing on `owner` is an error."""
    for name, saved in states.items():
        current = getattr(owner, name, None)
        if "torch" in saved and isinstance(current, torch.Generator):
            current.set_state(saved["torch"])
        elif "numpy" in saved and isinstance(current, np.random.Generator):
            current.bit_generator.state = saved["numpy"]
        elif "numpy_legacy" in saved and isinstance(current, np.random.RandomState):
            current.set_state(saved["numpy_legacy"])
        else:
            raise CheckpointError(
                f"The checkpoint holds a random generator {name!r} that {type(owner).__name__} does not have; "
                "it was written by a different method or version."
            )


# ----------------------------------------------------------------------------- identity
def split_hash(bundle: Any) -> str:
    """SHA-256 (16 hex digits) of the sample ids of every split and auxiliary dataset of a bundle."""
    digest = hashlib.sha256()
    for name in ("train", "dev", "val", "test"):
        split = getattr(bundle, name, None)
        digest.update(name.encode())
        if split is not None:
            digest.update(split.index.detach().cpu().long().numpy().tobytes())
    for name, dataset in sorted(getattr(bundle, "aux_train", {}).items()):
        digest.update(f"aux:{name}".encode())
        digest.update(dataset.index.detach().cpu().long().numpy().tobytes())
    return digest.hexdigest()[:16]


def describe_value(value: Any) -> Any:
    """A plain, comparable description of a configuration value (dataclasses as dicts, callables by name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe_value(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__, **{f.name: describe_value(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    text = repr(value)
    return text if " at 0x" not in text else type(value).__name__


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences ``key: <saved> in the checkpoint, <current> now`` (empty: same run)."""
    a, b = _flatten(dict(saved)), _flatten(dict(current))
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            out.append(f"{key}: {va!r} in the checkpoint, {vb!r} now")
    return out


def check_identity(path: str | os.PathLike, saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Refuse (`CheckpointError`) to resume the run `current` from a checkpoint of another run."""
    path = Path(path)
    fresh = f"resume with the same settings, or start fresh: delete {path.parent} or pass another checkpoint_dir (resume=False overwrites it)"
    if saved is None:
        raise CheckpointError(f"Checkpoint {path} records no run identity, so it cannot be checked; {fresh}.")
    diffs = identity_differences(saved, current)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise CheckpointError(f"Checkpoint {path} belongs to a different run ({shown}); {fresh}.")
