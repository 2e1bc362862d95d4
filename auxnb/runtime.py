"""Where a run computes: CPU threads and the device, checked before any work.

**Threads.** auxnb trains on one CPU thread unless told otherwise (``Trainer(threads=N)``,
``python -m auxnb ... --threads N`` or ``AUXNB_THREADS=N``; ``0`` keeps torch's own default,
one thread per physical core). The models auxnb runs on a CPU are small (an MLP, a 4-layer
ConvNet, ResNet-18 on 8×8 digits): a second thread saves little on an idle machine, and on a
shared one torch's default costs several times the wall-clock time (``benchmarks/threads.py``
measures both in one run and prints the ratio; the README gives the figures). One thread also
gives the same numbers on every machine, whatever its core count. The setting holds while a
`Trainer` fits and is restored afterwards (torch's thread count is global to the process).

**Devices.** `check_device` refuses, when the Trainer is built, a device this machine or this
torch build cannot use (``"mps"`` off a Mac, ``"xpu"`` without one), with the fix in the message.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

__all__ = ["THREADS_ENV", "DEFAULT_THREADS", "resolve_threads", "using_threads", "with_threads", "check_device"]

#: Environment variable for the default number of CPU threads.
THREADS_ENV = "AUXNB_THREADS"
#: The default when neither the argument nor ``$AUXNB_THREADS`` is given.
DEFAULT_THREADS = 1
#: torch's own default, read when auxnb is imported (``threads=0`` asks for it).
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def _parse(value: Any, source: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{source} must be an int >= 0 (0: torch's default), got {value!r}; e.g. threads=1.")
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(
                f"{source}={value!r} is not a whole number of CPU threads; give e.g. {source}=1 "
                "(0: torch's default, one per core)."
            )
        value = int(text)
    if not isinstance(value, int):
        raise TypeError(f"{source} must be an int >= 0 (0: torch's default), got {value!r} ({type(value).__name__}).")
    if value < 0:
        raise ValueError(f"{source} must be >= 0 (0: torch's default, one per core), got {value}.")
    return value


def resolve_threads(threads: int | None = None) -> int:
    """The CPU threads a run uses: `threads`, else ``$AUXNB_THREADS``, else `DEFAULT_THREADS` (1).

    ``0`` means torch's default (one thread per physical core, or ``$OMP_NUM_THREADS``).

    Example:
        >>> resolve_threads(2), resolve_threads(0) == TORCH_DEFAULT_THREADS
        (2, True)
    """
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        threads = _parse(env, THREADS_ENV) if env else DEFAULT_THREADS
    else:
        if isinstance(threads, str):  # text is for $AUXNB_THREADS and --threads; Python takes the number
            raise TypeError(f"threads must be an int >= 0 (0: torch's default), got the string {threads!r}; "
                            f"e.g. threads={threads.strip() if threads.strip().isdigit() else 1}.")
        threads = _parse(threads, "threads")
    return threads if threads > 0 else TORCH_DEFAULT_THREADS


class using_threads:
    """Context manager: torch uses `threads` CPU threads inside, the previous number after."""

    def __init__(self, threads: int):
        self.threads = int(threads)

    def __enter__(self) -> int:
        self.previous = torch.get_num_threads()
        if self.threads != self.previous:
            torch.set_num_threads(self.threads)
        return self.threads

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.previous:
            torch.set_num_threads(self.previous)


def with_threads(fit: Callable) -> Callable:
    """Decorator for a method of an object with a ``threads`` attribute (the Trainer's `fit`)."""

    @functools.wraps(fit)
    def wrapper(self, *args, **kwargs):
        with using_threads(self.threads):
            return fit(self, *args, **kwargs)

    return wrapper


def check_device(device: torch.device) -> torch.device:
    """`device` if this machine can compute there, else a `RuntimeError` naming the fix.

    CUDA devices are checked by `auxnb.train.resolve_device`; this covers the others.
    """
    kind = device.type
    if kind in ("cpu", "cuda", "meta"):
        return device
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            built = backend is not None and backend.is_built()
            why = "this machine has no Apple GPU (MPS needs macOS 12.3+ on Apple silicon or an AMD GPU)" if built \
                else "this torch build has no MPS support"
            raise RuntimeError(
                f"Device 'mps' was asked for but {why}; use device='cpu' "
                "(--device cpu or AUXNB_DEVICE=cpu on the command line)."
            )
        return device
    module = getattr(torch, kind, None)
    available = getattr(module, "is_available", None)
    if callable(available) and available():
        return device
    raise RuntimeError(
        f"Device {str(device)!r} is not available on this machine or in this torch build; auxnb runs on "
        "'cpu', 'cuda' / 'cuda:N' (and 'mps' on a Mac): use device='cpu' (--device cpu or AUXNB_DEVICE=cpu)."
    )
