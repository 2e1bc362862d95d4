"""Lower steps per second of the Trainer (STL) against a plain PyTorch loop: same model, data, optimiser.

Both train the same ConvNet4 (or ResNet18) `MultiHeadModel` with Adam on the same synthetic
uint8 images (CIFAR shapes by default; ``--shape resnet18`` for 224×224 ImageNet shapes), the
same batches (the Trainer's shuffling, re-created in the loop) and the same input transform
(Z-score on the batch's device). Runs alternate (loop, Trainer, loop, Trainer, ...) and the
printed ratio is Trainer time per step / loop time per step, median over repeats, measured in
one process (machines are noisy; compare ratios). Goal: ≤ 1.05 on a CPU.

    python benchmarks/throughput.py                       # ConvNet4, 32×32, batch 128, CPU
    python benchmarks/throughput.py --device cuda --amp bf16
    python benchmarks/throughput.py --shape resnet18 --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from auxnb.data import DataBundle, TaskDataset
from auxnb.data.augment import ImageTransform
from auxnb.models import ConvNet4, MultiHeadModel, ResNet18
from auxnb.tasks import Task, TaskSet
from auxnb.train import BatchStream, Trainer

SHAPES = {"convnet4": (3, 32, 10), "resnet18": (3, 224, 37)}


def make(shape: str, n: int, seed: int = 0):
    channels, side, classes = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    tasks = TaskSet([Task("class", "classification", classes, primary=True)])
    transform = ImageTransform((0.5,) * channels, (0.25,) * channels, random=False)
    ds = TaskDataset(images, {"class": labels})
    bundle = DataBundle(tasks=tasks, train=ds, val=ds.subset(torch.arange(min(n, 64))), test=ds.subset(torch.arange(min(n, 64))),
                        transform=transform, eval_transform=transform)
    return bundle, tasks


def model_for(shape: str, tasks: TaskSet, seed: int) -> MultiHeadModel:
    torch.manual_seed(seed)
    channels, side, _ = SHAPES[shape]
    backbone = ConvNet4(in_channels=channels, input_size=side) if shape == "convnet4" else ResNet18(in_channels=channels)
    return MultiHeadModel.for_tasks(backbone, tasks)


def plain_loop(shape: str, bundle: DataBundle, tasks: TaskSet, steps: int, batch: int, device: str, amp: str | None, seed: int):
    """(wall, CPU) seconds per step of the textbook loop: batch -> device -> transform -> forward -> CE -> backward -> Adam."""
    model = model_for(shape, tasks, seed).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = BatchStream(bundle.train, batch, seed)  # same order as the Trainer's
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x, t = stream.next()
        x, y = x.to(device, non_blocking=True), t["class"].to(device, non_blocking=True)
        x = bundle.transform(x)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=amp is not None):
            _, out = model(x, ["class"])
            loss = F.cross_entropy(out["class"].float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def trainer_run(shape: str, bundle: DataBundle, tasks: TaskSet, steps: int, batch: int, device: str, amp: str | None, seed: int):
    """(wall, CPU) seconds per lower step of the Trainer with STL.

    Wall: the Trainer's own lower-step clock (evaluation excluded). CPU: process time of the
    whole `fit()` (its one evaluation on 64 val and 64 test images included: counted against
    the Trainer), robust to other processes on a shared machine.
    """
    model = model_for(shape, tasks, seed)
    trainer = Trainer(model, "stl", bundle, steps=steps, eval_every=steps, batch_size=batch, optimizer="adam", lr=1e-3,
                      seed=seed, device=device, amp=amp, progress=False)
    c0 = time.process_time()
    result = trainer.fit()
    return result.timings["lower_s"] / steps, (time.process_time() - c0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="convnet4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=2048, help="training images")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle, tasks = make(args.shape, args.n)
    plain_loop(args.shape, bundle, tasks, 3, args.batch, args.device, args.amp, 0)  # warm-up
    trainer_run(args.shape, bundle, tasks, 3, args.batch, args.device, args.amp, 0)
    loop, trainer = [], []
    for r in range(args.repeats):
        loop.append(plain_loop(args.shape, bundle, tasks, args.steps, args.batch, args.device, args.amp, r))
        trainer.append(trainer_run(args.shape, bundle, tasks, args.steps, args.batch, args.device, args.amp, r))
    print(f"{args.shape} batch={args.batch} device={args.device} amp={args.amp} steps={args.steps} repeats={args.repeats} "
          f"threads={args.threads}")
    for k, clock in enumerate(("wall", "cpu")):
        a, b = statistics.median(x[k] for x in loop), statistics.median(x[k] for x in trainer)
        ratios = [t[k] / l[k] for l, t in zip(loop, trainer)]
        print(f"[{clock}] plain loop: {a * 1e3:.1f} ms/step ({1 / a:.1f} steps/s)   Trainer STL: {b * 1e3:.1f} ms/step "
              f"({1 / b:.1f} steps/s)   Trainer / loop: {statistics.median(ratios):.3f} "
              f"(per repeat: {', '.join(f'{x:.3f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
