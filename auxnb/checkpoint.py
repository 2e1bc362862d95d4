"""Checkpoint files that cannot run code, cannot be mixed up, and resume a run bit for bit.

A checkpoint is written atomically and read with ``torch.load(..., weights_only=True)``: it holds
tensors and plain Python values only (numpy values are stored as tagged tensors and restored as
numpy). It carries the run's identity; resuming a different run from it is refused. Nothing here
trains, prints or touches the data pipeline.

Integrity: before anything is unpickled, every entry of the file's zip archive is checked against
its CRC-32; after loading, the SHA-256 `payload_digest` written with the file is recomputed
(tensor bytes, dtypes, shapes, keys and values); model weights must be finite. A damaged file is
refused naming the file and the remedy; it is never resumed from. Writers use a temporary name
unique to the process (``<name>.<pid>.<random>.tmp``), and a full disk is reported as such with
nothing left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import os
import random
import secrets
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

__all__ = [
    "CheckpointError", "FolderInUse", "Checkpoint", "FORMAT", "save", "load", "encode", "decode", "capture_rng", "restore_rng",
    "generator_states", "restore_generators", "split_hash", "identity_differences", "check_identity", "check_model_layout",
    "describe_value", "payload_digest", "temporary_name", "write_bytes", "disk_full_error",
    "pid_alive", "remove_stale_temporaries", "write_csv", "folder_lock", "LOCK_NAME",
]

#: Format tag of auxnb checkpoints (bumped when the layout changes incompatibly).
FORMAT = "auxnb-checkpoint/1"

_ARRAY = "__auxnb_ndarray__"
_SCALAR = "__auxnb_npscalar__"
_OBJECT_ARRAY = "__auxnb_ndarray_list__"
_TUPLE = "__auxnb_tuple__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, from another run, or missing when required."""


class FolderInUse(RuntimeError):
    """Another run holds the checkpoint folder (`folder_lock`). Not a `CheckpointError`: the folder's
    checkpoints are fine and must not be discarded (a sweep restarts a run whose checkpoint is bad)."""


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


# ----------------------------------------------------------------------------- integrity
#: Entries whose floating tensors must be finite (a model's weights: the live ones and the best-on-val copy).
_FINITE_ENTRIES = (("model",), ("state", "best"), ("weights",))


def payload_digest(value: Any) -> str:
    """SHA-256 (hex) of an encoded payload: every key, value, tensor dtype, shape and byte, in order.

    Written into each checkpoint as ``checksum`` and recomputed on load, so one flipped bit in any
    tensor (model, optimiser, method state, random states) or value is detected.
    """
    digest = hashlib.sha256()
    _digest(value, digest)
    return digest.hexdigest()


def _digest(value: Any, digest: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(value, dict):
        digest.update(b"D%d" % len(value))
        for k, v in value.items():
            _digest(k, digest)
            _digest(v, digest)
    elif isinstance(value, (list, tuple)):
        digest.update(b"L%d" % len(value) if isinstance(value, list) else b"U%d" % len(value))
        for v in value:
            _digest(v, digest)
    elif isinstance(value, float):
        digest.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, bytes):
        digest.update(b"B%d:" % len(value) + value)
    else:  # None, bool, int, str, torch.Size / dtype / device reprs
        text = f"{type(value).__name__}:{value!r}".encode()
        digest.update(b"S%d:" % len(text) + text)


class Checkpoint(dict):
    """A loaded checkpoint: a dict whose missing entries are errors naming the entry and the file."""

    def __init__(self, data: Mapping[str, Any], path: Path, fix: str) -> None:
        super().__init__(data)
        self.path, self.fix = path, fix

    def __missing__(self, key: str) -> Any:
        raise CheckpointError(
            f"Checkpoint {self.path} has no {key!r} entry (entries: {', '.join(sorted(map(str, self)))}); it was "
            f"written by another program or version, or edited; {self.fix}."
        )


def _verify_archive(path: Path, fix: str) -> None:
    """Every zip entry's CRC-32, checked before anything in the file is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError, NotImplementedError) as err:
        raise CheckpointError(f"Checkpoint {path} is damaged (its archive cannot be read: {err}); {fix}.") from None
    if bad is not None:
        raise CheckpointError(
            f"Checkpoint {path} is damaged: entry {bad!r} fails its CRC-32 check (a changed byte: disk, copy or "
            f"transfer error); it is not resumed from; {fix}."
        )


def _nonfinite(raw: Mapping[str, Any]) -> str | None:
    for keys in _FINITE_ENTRIES:
        value: Any = raw
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if not isinstance(value, dict):
            continue
        for name, t in value.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                return f"{'.'.join(keys)}[{name!r}] holds {bad} NaN/Inf value(s) of {t.numel()}"
    return None


# ----------------------------------------------------------------------------- files
def temporary_name(path: str | os.PathLike) -> Path:
    """A scratch name beside `path`, unique to this writer: ``<name>.<pid>.<random hex>.tmp``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether a process with id `pid` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete ``<name>.<pid>.<hex>.tmp`` files beside `path` left by writers that were killed (dead pid)."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f"{path.name}.*.*.tmp"):
        middle = tmp.name[len(path.name) + 1: -len(".tmp")].split(".")
        if len(middle) == 2 and middle[0].isdigit() and not pid_alive(int(middle[0])):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def disk_full_error(path: str | os.PathLike, err: OSError) -> OSError:
    """`err` restated: "disk full" (ENOSPC / EDQUOT) naming the file, else the original error naming it."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OSError(err.errno, f"Disk full while writing {path}: nothing was written (no partial file is left); "
                                  "free space on that disk or write to another folder, then run again")
    return OSError(err.errno, f"Could not write {path}: {err.strerror or err}; nothing was written (no partial file is left)")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically through a writer-unique temporary name (fsynced, then renamed).

    On any OSError the temporary file is removed and a full disk is reported as "Disk full".
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise disk_full_error(path, err) from None
    remove_stale_temporaries(path)
    return path


def write_csv(path: str | os.PathLike, frame: Any) -> Path:
    """A pandas DataFrame as CSV at `path`, atomically (`write_bytes`: unique temporary, "Disk full" on ENOSPC)."""
    return write_bytes(path, frame.to_csv(index=False).encode())


#: The lock file a running writer holds in its checkpoint folder.
LOCK_NAME = ".auxnb.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike | None) -> Iterator[Path | None]:
    """Hold `folder` for this writer: a second writer (another process, or another run here) is refused
    up front with `FolderInUse` naming the holder; an unwritable folder is a `CheckpointError` (the
    writable-folder check before training).

    The lock is an OS advisory lock (``flock``) on ``<folder>/.auxnb.lock``, which also records the
    holder's pid and host: a killed holder's lock is released by the kernel, so a stale lock file
    is simply taken over. ``None`` holds nothing. (Without ``fcntl``, e.g. on Windows, only the
    writable check is made.)
    """
    if folder is None:
        yield None
        return
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise CheckpointError(
            f"The checkpoint folder {folder} is not writable ({err.strerror or err}); nothing was trained. Choose "
            "another checkpoint directory or fix its permissions, then run again."
        ) from None
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held; other errors (ENOLCK on some network file systems) mean no locking there
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "an unknown process"
                raise FolderInUse(
                    f"The checkpoint folder {folder} is in use by another run ({holder}); two runs writing one folder "
                    "would overwrite each other's checkpoints. Wait for that run to finish or stop it, or give this "
                    "run another checkpoint directory."
                ) from None
            except OSError:
                pass
        import socket

        record = f"pid {os.getpid()} on {socket.gethostname()}".encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError as err:
            raise disk_full_error(path, err) from None
        yield path
    finally:
        os.close(fd)  # releases the flock


def save(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write `payload` (encoded, with its `payload_digest`) to `path` atomically: a killed writer never
    leaves a half file, two writers never share a temporary name, a full disk leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = encode({"format": FORMAT, **payload})
    body["checksum"] = payload_digest(body)
    buffer = io.BytesIO()
    torch.save(body, buffer)  # serialised in memory: a write error is an OSError, not torch's enforce message
    return write_bytes(path, buffer.getvalue())


def load(path: str | os.PathLike, *, remedy: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by `save` (``weights_only=True``: it cannot run code).

    Raises `CheckpointError` naming the file and what to do when it is empty, truncated, damaged
    (a zip CRC or the payload checksum fails), not a checkpoint, holds anything but tensors and
    plain values, or holds NaN/Inf model weights. The result is a dict whose missing entries raise
    `CheckpointError` naming the entry and the file.
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
    _verify_archive(path, fix)
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
    if "checksum" in raw:  # files written before checksums were added carry none (their zip CRCs were checked)
        written = raw.pop("checksum")
        if written != payload_digest(raw):
            raise CheckpointError(
                f"Checkpoint {path} is damaged: its contents do not match the checksum written with it (a changed "
                f"tensor or value); it is not resumed from; {fix}."
            )
    bad = _nonfinite(raw)
    if bad is not None:
        raise CheckpointError(f"Checkpoint {path} is not usable: {bad} (a diverged or damaged run); {fix}.")
    return Checkpoint(decode(raw), path, fix)


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


#: Parameter-name prefix of batched task heads (`auxnb.models.LinearBank`, ``MultiHeadModel.head_banks``).
_BANK_PREFIX = "head_banks."


def check_model_layout(path: str | os.PathLike, state: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Refuse (`CheckpointError`) model weights whose entries are not the model's, before loading them.

    In particular a checkpoint written when the task heads were one module each (``heads.<task>.weight``)
    for a model that now stores them as one batched module (``head_banks.linear<i>.weight``
    ``[tasks, out, in]``: many-task settings such as ``cub-attributes-312``, issue 23), or the reverse.
    The message names the layout change and the fix; it is never a KeyError or a load_state_dict trace.
    """
    path = Path(path)
    expected = list(model.state_dict().keys())
    saved = list(state.keys())
    if set(saved) == set(expected):
        return
    fresh = (f"this checkpoint cannot be resumed: retrain the run from scratch (delete {path.parent}, or resume=False / "
             "no --resume), or finish it with the auxnb version that wrote it")
    was, now = any(k.startswith(_BANK_PREFIX) for k in saved), any(k.startswith(_BANK_PREFIX) for k in expected)
    if was != now:
        per_head = sum(1 for k in (expected if was else saved) if k.startswith("heads."))
        banks = sorted({k.split(".")[1] for k in (saved if was else expected) if k.startswith(_BANK_PREFIX)})
        old, new = (("one batched module per head shape", "one module per task head") if was
                    else ("one module per task head", "one batched module per head shape"))
        raise CheckpointError(
            f"Checkpoint {path} stores the model's task heads as {old} "
            f"({'head_banks: ' + ', '.join(banks) if was else f'{per_head} heads.<task> tensors'}), but this model stores "
            f"them as {new} ({', '.join(banks) + ' in head_banks' if now else f'{per_head} heads.<task> tensors'}): "
            "auxnb stores 32 or more same-shape linear heads as one LinearBank (weight [tasks, out, in]) since issue 23. "
            f"The optimiser state of the two layouts differs, so {fresh}."
        )
    missing = [k for k in expected if k not in set(saved)]
    extra = [k for k in saved if k not in set(expected)]
    shown = lambda names: ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")  # noqa: E731
    raise CheckpointError(
        f"Checkpoint {path} holds weights of another model"
        + (f" (missing here: {shown(missing)}" if missing else " (")
        + (f"{'; ' if missing else ''}not in this model: {shown(extra)})" if extra else ")")
        + f"; {fresh}."
    )
