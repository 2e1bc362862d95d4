"""What checkpoint integrity costs: auxnb's save / load (payload SHA-256, zip CRC-32 check,
finiteness check, writer-unique temporary) against a plain ``torch.save`` + fsync + rename /
``torch.load(weights_only=True)`` of the same payload, timed in the same process.

The payload is a training checkpoint's bulk: a model's weights, Adam's two moments and a best-on-val
copy (4 x the parameters). Medians over repeats, interleaved; the ratios are what to compare.

    python benchmarks/checkpoint_integrity.py                 # ResNet-18 (11.7 M parameters)
    python benchmarks/checkpoint_integrity.py --model convnet4 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from auxnb import checkpoint as ckpt_io


def _payload(model: str) -> dict:
    if model == "resnet18":
        from torchvision.models import resnet18

        net = resnet18(num_classes=100)
    else:
        from auxnb.models import ConvNet4

        net = ConvNet4(3)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    adam = {i: {"exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)} for i, v in enumerate(state.values())
            if v.is_floating_point()}
    return {"model": state, "optimizer": {"state": adam, "param_groups": [{"lr": 1e-3}]}, "rng": {"torch": torch.get_rng_state()},
            "state": {"best": {k: v.clone() for k, v in state.items()}, "step": 100}}


def _plain_save(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save({"format": ckpt_io.FORMAT, **payload}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet18", "convnet4"), default="resnet18")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    payload = _payload(args.model)
    folder = Path(tempfile.mkdtemp(prefix="auxnb-ckpt-bench-"))
    times: dict[str, list[float]] = {k: [] for k in ("plain_save", "auxnb_save", "plain_load", "auxnb_load")}
    for _ in range(args.repeats):
        for name, fn in (("plain_save", lambda: _plain_save(folder / "plain.pt", payload)),
                         ("auxnb_save", lambda: ckpt_io.save(folder / "auxnb.pt", payload)),
                         ("plain_load", lambda: torch.load(folder / "plain.pt", map_location="cpu", weights_only=True)),
                         ("auxnb_load", lambda: ckpt_io.load(folder / "auxnb.pt"))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    size = (folder / "auxnb.pt").stat().st_size / 2**20
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}; model {args.model}; file {size:.0f} MiB; median of {args.repeats}")
    print(f"save: plain {med['plain_save']:.3f} s, auxnb {med['auxnb_save']:.3f} s, ratio {med['auxnb_save'] / med['plain_save']:.2f}")
    print(f"load: plain {med['plain_load']:.3f} s, auxnb {med['auxnb_load']:.3f} s, ratio {med['auxnb_load'] / med['plain_load']:.2f}")
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
