"""Cost of each method relative to STL, measured in one process on the digits-rotation setting.

For every method: time per lower step (lower_s / steps) and the whole run's time per step
(lower + upper steps), both as medians over repeats and as ratios to STL measured in the same
run (machines are noisy; ratios are what to compare). Methods are interleaved across repeats.

    python benchmarks/step_cost.py                 # all registered benchmark entries
    python benchmarks/step_cost.py --methods stl,gcs --repeats 5 --steps 60
    python benchmarks/step_cost.py --clock cpu --methods gcs,forkmerge,auxinash,auto-lambda,aggregator-upgrad,aggregator-pcgrad,aggregator-mgda,aggregator-cagrad,aggregator-nash-mtl
                                                   # issue 24: the new methods beside GCS, with their backward passes
    python benchmarks/step_cost.py --many-tasks 312 --methods stl,equal,jtds,n-jtds   # cost with 312 aux tasks vs 1
    python benchmarks/step_cost.py --per-loss-grads --steps 100   # MAOAL: batched vs looped per-loss gradients, N + N/T
    python benchmarks/step_cost.py --cost-model    # MAOAL/JTDS/DTG: the upper step's passes, counted and timed, vs Equal
    python benchmarks/step_cost.py --many-tasks 312 --cost-model --steps 60   # JTDS, 312 tasks vs 1, phase by phase
    python benchmarks/step_cost.py --many-tasks 312 --layout both --steps 40   # issue 23: 312 heads one module each vs one bank
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from auxnb import experiments
from auxnb.experiments.core import get_setting, resolve_config
from auxnb.methods import get
from auxnb.train import Trainer

#: name -> (registry name, kwargs). Later issues add their methods here.
ENTRIES: dict[str, tuple[str, dict]] = {
    "stl": ("stl", {}),
    "equal": ("equal", {}),
    "fixed": ("fixed", {"weights": {"rotation": 0.5}}),
    "uncert": ("uncert", {}),
    "gcs": ("gcs", {}),
    # --- MAOAL / AuxL (issue 4) ---
    "maoal": ("maoal", {}),  # Block-L, T = 20, M = 3, η = lower lr (the paper's CIFAR setting)
    "maoal-parameter": ("maoal", {"partition": "parameter"}),  # Parameter-L: one α per parameter tensor
    "auxl": ("auxl", {}),  # nonlinear combination net, T = 20, K = 3
    "auxl-linear": ("auxl", {"kind": "linear"}),
    # --- JTDS / N-JTDS (issue 5) ---
    # the recommended M = 5, K = 3, η = 1/λ_max, without its 40-step warm-up: the cost per lower step once φ
    # moves (a whole run of S steps costs (S − 40)/S of the difference to Equal); a 40-step run would be all warm-up
    "jtds": ("jtds", {"warmup": 0}),
    # the same with uᵀ∂g/∂φ by a double backward, as before `forward_mode` (methods_learn.md §14)
    "jtds-vjp": ("jtds", {"warmup": 0, "forward_mode": False}),
    "n-jtds": ("n-jtds", {}),
    # --- DTG / MixUp / MAXL (issue 6) ---
    "dtg": ("dtg", {}),
    "dtg-no-reg": ("dtg", {"instance_reg": 0.0}),
    "mixup": ("mixup", {}),
    "f-mixup": ("f-mixup", {}),
    "auto-mix": ("auto-mix", {}),
    "auto-f-mix": ("auto-f-mix", {}),
    "maxl": ("maxl", {}),
    # --- after the three papers (issue 24): per-task gradients like GCS (K+1 backward passes a step) ---
    "aggregator-upgrad": ("aggregator", {"aggregator": "upgrad"}),
    "aggregator-pcgrad": ("aggregator", {"aggregator": "pcgrad"}),
    "aggregator-mgda": ("aggregator", {"aggregator": "mgda"}),
    "aggregator-cagrad": ("aggregator", {"aggregator": "cagrad"}),
    "aggregator-nash-mtl": ("aggregator", {"aggregator": "nash-mtl"}),
    # Nash-MTL solving its bargaining problem every 10th step and reusing the weights between (TorchJD's
    # and the Nash-MTL authors' `update_weights_every`; their default is 1, every step)
    "aggregator-nash-mtl-every10": ("aggregator", {"aggregator": "nash-mtl", "options": {"update_weights_every": 10}}),
    "auto-lambda": ("auto-lambda", {}),  # a look-ahead every lower step, as the authors' code
    "auxinash": ("auxinash", {}),  # K+1 backward passes a lower step, a hyper-step every 25
    # two branches (all tasks, primary alone): the host's step plus the primary branch's; a merge every Δt
    "forkmerge": ("forkmerge", {}),  # Δt "auto": a merge every quarter of the timing run (lower ms: the lower step alone)
    "forkmerge-dt20": ("forkmerge", {"interval": 20}),  # a merge every 20 steps (7 candidates on 4 D_dev batches)
    # the dearest two branches: both joint (the other forwards the rotated copies too), no merge in the run
    "forkmerge-2joint": ("forkmerge", {"branches": ["all", {"digit": 1.0, "rotation": 0.5}]}),
    # --- issue 22: the recommended MAOAL/JTDS/DTG as the Fashion-MNIST `small` runs of no_harm.py train them
    # (T = 10, JTDS with its 40-step warm-up), with K = 3 and K = 2 Neumann terms (MAOAL's default already is 2).
    # Measure them over a whole run's length: --setting fashion-rotation --steps 310 (f-noise-40%-long) or 93
    # (K spelled out: K = 2 is the default since the cost round, K = 3 was before it)
    "maoal-small": ("maoal", {"lower_steps": 10}),
    "jtds-small-k3": ("jtds", {"lower_steps": 10, "terms": 3}),
    "jtds-small-k2": ("jtds", {"lower_steps": 10, "terms": 2}),
    # the same with the upper step's last product uᵀ∂g/∂φ by a double backward, as before forward_mode
    # (methods_learn.md §14): the default's whole-run cost against it in one run
    "jtds-small-k2-vjp": ("jtds", {"lower_steps": 10, "terms": 2, "forward_mode": False}),
    # λ_max (η = 1/λ_max) re-estimated every 40 upper slots instead of 10: once in a 310-step run at T = 10
    # (methods_learn.md §15)
    "jtds-small-k2-lam40": ("jtds", {"lower_steps": 10, "terms": 2, "auto_every": 40}),
    # the warm series advanced through the 40-step warm-up's upper slots too (methods_learn.md §22)
    "jtds-small-warmup-series": ("jtds", {"lower_steps": 10, "terms": 2, "warmup_series": True}),
    "dtg-small-k3": ("dtg", {"lower_steps": 10, "terms": 3}),
    "dtg-small-k2": ("dtg", {"lower_steps": 10, "terms": 2}),
    # issue 22 (methods_learn.md §13): one Neumann term, the cheaper DTG that was not adopted
    "dtg-small-k1": ("dtg", {"lower_steps": 10, "terms": 1}),
}


#: where the runs train (``--device``); on CUDA every timed region ends with a synchronisation
DEVICE = "cpu"


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def method_for(entry: str):
    """The entry's method alone: a method is what its name says (issue 23); the do-no-harm guard that
    `auxnb.experiments.run` adds to MAOAL, JTDS and DTG by default (``guard="auto"``) trains STL and
    Equal beside it, reported apart (`guarded`, the table's last column)."""
    method_name, kwargs = ENTRIES[entry]
    return get(method_name, **kwargs)


def guarded(entry: str) -> str | None:
    """The guard `auxnb.experiments.run` gives the entry by default (``"stl+equal"``) or None."""
    from auxnb.selection import resolve_guard

    method_name, _ = ENTRIES[entry]
    return resolve_guard("auto", method_name)


def measure(entry: str, setting: str, steps: int, batch_size: int, seed: int,
            passes: dict[str, int] | None = None) -> tuple[float, float]:
    """Seconds per lower step and per step of the whole run (lower + upper). With `passes` (a dict),
    the run's backward passes are counted into it (`counting_backward_passes`)."""
    config = resolve_config(setting, "small", {"batch_size": batch_size})
    bundle, model = get_setting(setting).build({**config, "seed": seed, "data_root": None})
    trainer = Trainer(model, method_for(entry), bundle, steps=steps, eval_every=steps,
                      batch_size=batch_size, seed=seed, device=DEVICE, progress=False)
    if passes is None:
        result = trainer.fit()
    else:
        with counting_backward_passes() as counted:
            result = trainer.fit()
        passes.update(counted)
    t = result.timings
    return t["lower_s"] / steps, (t["lower_s"] + t["upper_s"]) / steps


@contextlib.contextmanager
def counting_backward_passes():
    """Count the backward passes of the runs inside, by wrapping ``torch.autograd.grad`` and
    ``torch.autograd.backward`` (every method here reaches autograd through these two names).

    One backward pass is one cotangent pushed through a graph: a plain call counts 1, a call with
    ``is_grads_batched=True`` counts its batch of cotangents (`auxnb.hypergrad.per_loss_grads` takes
    K + 1 per-task gradients in one vmapped call: K + 1 passes, as the K + 1 calls of its fallback).
    A call that raises counts nothing (the batched attempt's fallback counts its own calls).
    Passes inside a bi-level method's upper step (`Trainer._upper`: Neumann products, look-aheads,
    ForkMerge's merge) are counted apart from the lower steps'. Yields a dict filled as the runs go:
    ``lower``, ``upper`` (passes) and ``upper_steps``.
    """
    from auxnb import train

    counts = {"lower": 0, "upper": 0, "upper_steps": 0}
    inside = {"upper": False}
    grad, backward, upper = torch.autograd.grad, torch.autograd.backward, train.Trainer._upper

    def rows(kwargs) -> int:
        if not kwargs.get("is_grads_batched", False):
            return 1
        first = kwargs["grad_outputs"]
        first = first if isinstance(first, torch.Tensor) else first[0]
        return int(first.shape[0])

    def add(n: int) -> None:
        counts["upper" if inside["upper"] else "lower"] += n

    def counted_grad(*a, **k):
        out = grad(*a, **k)
        add(rows(k))
        return out

    def counted_backward(*a, **k):
        out = backward(*a, **k)
        add(1)
        return out

    def counted_upper(self, run, step):
        inside["upper"] = True
        try:
            return upper(self, run, step)
        finally:
            inside["upper"] = False
            counts["upper_steps"] += 1

    torch.autograd.grad, torch.autograd.backward, train.Trainer._upper = counted_grad, counted_backward, counted_upper
    try:
        yield counts
    finally:
        torch.autograd.grad, torch.autograd.backward, train.Trainer._upper = grad, backward, upper


#: how `measure_many_tasks` stores the heads (``--layout``): None = `MultiHeadModel`'s default (a
#: `LinearBank` from `MultiHeadModel.BANK_HEADS` same-shape heads on), False = one module per head
BANK: bool | None = None


def measure_many_tasks(entry: str, n_aux: int, steps: int, batch_size: int, seed: int,
                       bank: bool | None = None) -> tuple[float, float]:
    """JTDS issue 5: per-step cost with `n_aux` binary auxiliary tasks on the primary images (CUB-like:
    312 attributes on one stream), on the real digits images with ConvNet4 and one head per task.

    The attributes are fixed random binary functions of the image (signs of random projections),
    so every task has real labels; only the cost is measured. `bank` (default `BANK`): the heads'
    layout, `MultiHeadModel(..., bank=...)` (issue 23: ``False`` is the layout before it).
    """
    from auxnb.data import TaskDataset, build_bundle, load_digits_source
    from auxnb.models import ConvNet4, MultiHeadModel
    from auxnb.tasks import Task, TaskSet

    images, labels = load_digits_source()
    g = torch.Generator().manual_seed(1234)
    proj = torch.randn(images[0].numel(), n_aux, generator=g)
    attrs = (images.flatten(1) @ proj > (images.flatten(1) @ proj).median(0).values).float()
    tasks = TaskSet([Task("digit", "classification", 10, primary=True)]
                    + [Task(f"attr{j}", "binary") for j in range(n_aux)])
    source = TaskDataset(images, {"digit": labels, **{f"attr{j}": attrs[:, j] for j in range(n_aux)}})
    bundle = build_bundle(source, tasks, val_size=300, test_size=500, dev_size=50, seed=seed)
    torch.manual_seed(seed)
    model = MultiHeadModel.for_tasks(ConvNet4(in_channels=1, input_size=8), tasks, bank=BANK if bank is None else bank)
    trainer = Trainer(model, method_for(entry), bundle, steps=steps, eval_every=steps,
                      batch_size=batch_size, seed=seed, device=DEVICE, progress=False)
    t = trainer.fit().timings
    return t["lower_s"] / steps, (t["lower_s"] + t["upper_s"]) / steps


def main_many_tasks_passes(args) -> None:
    """`--many-tasks N --cost-model`: where JTDS's extra cost with N tasks goes, phase by phase."""
    entry = "jtds"
    counts = (1, args.many_tasks)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    measure_many_tasks(entry, 1, 5, args.batch_size, 0)  # warm-up
    for r in range(args.repeats):
        for n in counts:
            runs[n].append(measure_passes(entry, "", args.steps, args.batch_size, r, n_aux=n))
    print(f"{entry}, digits + N binary tasks, ConvNet4; steps={args.steps} batch={args.batch_size} repeats={args.repeats} "
          f"threads={args.threads} device={DEVICE}; ms per lower step (medians), and per product")
    print(f"{'tasks':>6} {'whole':>7} {'lower':>7} {'upper':>7} {'forward':>8} {'G':>6} {'products':>9} {'power':>6} "
          f"{'P':>6} {'#products':>10} {'ms/product':>11}")
    med = {}
    for n in counts:
        m = {k: statistics.median(run[k] for run in runs[n]) for k in runs[n][0]}
        per = {k: m[k] * 1e3 / args.steps for k in ("lower", "upper", "forward", "direction", "hvp", "power", "phi_vjp")}
        products = m["n_hvp"] + m["n_power_hvp"]
        med[n] = whole = per["lower"] + per["upper"]
        print(f"{n:>6} {whole:7.1f} {per['lower']:7.1f} {per['upper']:7.1f} {per['forward']:8.1f} {per['direction']:6.1f} "
              f"{per['hvp']:9.1f} {per['power']:6.1f} {per['phi_vjp']:6.1f} {int(products):>10} "
              f"{(m['hvp'] + m['power_hvp']) * 1e3 / max(products, 1):11.1f}")
    print(f"{args.many_tasks} vs 1: {med[args.many_tasks] / med[1]:.2f}")


def main_layouts(args) -> None:
    """`--many-tasks N --layout both`: each method with N tasks, heads one module each (the layout
    before issue 23) against one `LinearBank`, interleaved in one process, and both against 1 task."""
    names = [m for m in args.methods.split(",") if m] if args.methods != ",".join(ENTRIES) else ["stl", "equal", "jtds", "n-jtds"]
    n = args.many_tasks
    keys = [(m, 1, None) for m in names] + [(m, n, b) for m in names for b in (False, True)]
    whole: dict[tuple, list[float]] = {k: [] for k in keys}
    measure_many_tasks("stl", 1, 5, args.batch_size, 0)  # warm-up
    for r in range(args.repeats):
        for m, count, b in keys:
            whole[(m, count, b)].append(measure_many_tasks(m, count, args.steps, args.batch_size, r, bank=b)[1])
    med = {k: statistics.median(v) for k, v in whole.items()}
    print(f"digits + N random binary attribute tasks, ConvNet4; steps={args.steps} batch={args.batch_size} "
          f"repeats={args.repeats} threads={args.threads} device={DEVICE}; ms per step (whole run / steps), medians")
    print(f"{'method':<10} {'1 task':>8} {f'{n} per-head':>13} {f'{n} bank':>9} {'per-head/bank':>14} "
          f"{f'per-head {n} vs 1':>17} {f'bank {n} vs 1':>13}")
    for m in names:
        one, per_head, bank = med[(m, 1, None)], med[(m, n, False)], med[(m, n, True)]
        print(f"{m:<10} {one * 1e3:8.2f} {per_head * 1e3:13.2f} {bank * 1e3:9.2f} {per_head / bank:14.2f} "
              f"{per_head / one:17.2f} {bank / one:13.2f}")


def main_many_tasks(args) -> None:
    """Cost with `--many-tasks N` auxiliary tasks relative to 1, per method (and relative to STL)."""
    names = [m for m in args.methods.split(",") if m] if args.methods != ",".join(ENTRIES) else ["stl", "equal", "jtds", "n-jtds"]
    if "stl" not in names:
        names.insert(0, "stl")
    counts = (1, args.many_tasks)
    whole: dict[tuple[str, int], list[float]] = {(m, n): [] for m in names for n in counts}
    measure_many_tasks("stl", 1, 5, args.batch_size, 0)  # warm-up
    for r in range(args.repeats):
        for n in counts:
            for m in names:
                whole[(m, n)].append(measure_many_tasks(m, n, args.steps, args.batch_size, r)[1])
    med = {k: statistics.median(v) for k, v in whole.items()}
    print(f"digits + N random binary attribute tasks, ConvNet4; steps={args.steps} batch={args.batch_size} "
          f"repeats={args.repeats} threads={args.threads} device={DEVICE}")
    print(f"{'method':<10} {'ms (1 aux)':>11} {'x STL':>6} {f'ms ({args.many_tasks} aux)':>13} {'x STL':>6} {f'{args.many_tasks} vs 1':>8}")
    for m in names:
        a, b = med[(m, 1)], med[(m, args.many_tasks)]
        print(f"{m:<10} {a * 1e3:11.2f} {a / med[('stl', 1)]:6.2f} {b * 1e3:13.2f} {b / med[('stl', args.many_tasks)]:6.2f} {b / a:8.2f}")


# --- MAOAL / AuxL (issue 4): per-loss gradients batched vs looped, against the paper's cost model ---


def _median_times(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each zero-argument callable, interleaved (machines are noisy), after a warm-up."""
    import time

    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up (vmap builds its batching rules once)
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_per_loss_grads(n_losses: int, batch_size: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Seconds for N per-loss gradients of losses that share one forward pass (ConvNet4, real digits).

    N − 1 auxiliary losses are binary attribute tasks (fixed random projections of the image, one
    head each, all on the primary stream) so that N can grow; the primary loss is the digit.
    ``sum``: one backward of the summed loss (a fixed-weight step: the paper's unit "1");
    ``batched``: the N gradients in one vmapped call (`per_loss_grads(batched=True)`);
    ``looped``: N backward passes, one per loss (what MAOAL does with ``batched=False``).
    The forward pass is included in every timing.
    """
    from auxnb.data import load_digits_source
    from auxnb.hypergrad import per_loss_grads
    from auxnb.models import ConvNet4, MultiHeadModel
    from auxnb.tasks import Task, TaskSet

    images, labels = load_digits_source()
    g = torch.Generator().manual_seed(1234 + seed)
    proj = torch.randn(images[0].numel(), max(n_losses - 1, 1), generator=g)
    scores = images.flatten(1) @ proj
    attrs = (scores > scores.median(0).values).float()
    tasks = TaskSet([Task("digit", "classification", 10, primary=True)]
                    + [Task(f"attr{j}", "binary") for j in range(n_losses - 1)])
    torch.manual_seed(seed)
    model = MultiHeadModel.for_tasks(ConvNet4(in_channels=1, input_size=8), tasks)
    params = [p for p in model.parameters() if p.requires_grad]
    idx = torch.randperm(len(labels), generator=g)[:batch_size]
    x, y = images[idx], labels[idx]

    def losses() -> list[torch.Tensor]:
        _, out = model(x, tasks.names)
        values = [torch.nn.functional.cross_entropy(out["digit"], y)]
        values += [torch.nn.functional.binary_cross_entropy_with_logits(out[f"attr{j}"][:, 0], attrs[idx, j])
                   for j in range(n_losses - 1)]
        return values

    def looped():
        values = losses()
        return [per_loss_grads([v], params, retain_graph=i < len(values) - 1) for i, v in enumerate(values)]

    return _median_times({
        "sum": lambda: torch.autograd.grad(torch.stack(losses()).sum(), params),
        "batched": lambda: per_loss_grads(losses(), params, batched=True),
        "looped": looped,
    }, repeats)


def measure_maoal_direction(setting: str, batch_size: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Seconds for one lower direction on a real setting's batch (digits-rotation: the primary
    images and their 4 rotations are two forward passes, so the losses' graphs are disjoint).

    ``sum``: Equal's direction (one backward of the summed loss); ``maoal``: MAOAL's direction
    (one backward per stream, then the module-wise combination); ``one-vmap``: the per-loss
    gradients of all losses in one vmapped call regardless of streams; ``stacked-loop``:
    `per_loss_grads(batched=False)` over all losses.
    """
    from auxnb.hypergrad import per_loss_grads
    from auxnb.methods.base import SetupInfo, compute_terms

    config = resolve_config(setting, "small", {"batch_size": batch_size})
    bundle, model = get_setting(setting).build({**config, "seed": seed, "data_root": None})
    tasks = bundle.tasks
    x, t = bundle.train.gather(torch.arange(batch_size))
    batch = {"primary": (x, t), **{name: view(x, t) for name, view in bundle.views.items()}}
    for name, ds in bundle.aux_train.items():
        batch[name] = ds.gather(torch.arange(batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    method = get("maoal")
    method.setup(model, SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=len(bundle.train), seed=seed))

    def means():
        terms = compute_terms(model, batch, tasks)
        return terms, [terms.mean(n) for n in tasks.names]

    return _median_times({
        "sum": lambda: torch.autograd.grad(torch.stack(means()[1]).sum(), params),
        "maoal": lambda: method.direction(means()[0], params),
        "one-vmap": lambda: per_loss_grads(means()[1], params, batched=True),
        "stacked-loop": lambda: per_loss_grads(means()[1], params, batched=False),
    }, repeats)


def main_per_loss(args) -> None:
    """MAOAL's cost: per-loss gradients batched vs looped, and whole runs against N + N/T."""
    repeats = max(args.repeats, 5) * 4
    print(f"(a) N losses sharing one forward pass, ConvNet4 + digits, batch={args.batch_size}, threads={args.threads}; "
          "ms, and ratios to one backward of the summed loss (the paper's unit '1')")
    print(f"{'N losses':>8} {'sum ms':>8} {'batched ms':>11} {'x sum':>6} {'looped ms':>10} {'x sum':>6} {'looped/batched':>15}")
    for n in (2, 4, 8):
        t = measure_per_loss_grads(n, args.batch_size, repeats)
        print(f"{n:>8} {t['sum'] * 1e3:8.2f} {t['batched'] * 1e3:11.2f} {t['batched'] / t['sum']:6.2f} "
              f"{t['looped'] * 1e3:10.2f} {t['looped'] / t['sum']:6.2f} {t['looped'] / t['batched']:15.2f}")
    t = measure_maoal_direction(args.setting, args.batch_size, repeats)
    print(f"\n(b) one lower direction on {args.setting} (ms; x Equal's one backward of the sum)")
    for k, v in t.items():
        print(f"{k:<13} {v * 1e3:9.2f} {v / t['sum']:6.2f}")
    names = ["stl", "equal", "maoal", "auxl"]
    whole: dict[str, list[float]] = {m: [] for m in names}
    lower: dict[str, list[float]] = {m: [] for m in names}
    measure("stl", args.setting, 5, args.batch_size, 0)  # warm-up
    for r in range(args.repeats):
        for m in names:
            lo, wh = measure(m, args.setting, args.steps, args.batch_size, r)
            lower[m].append(lo)
            whole[m].append(wh)
    med_lo = {m: statistics.median(v) for m, v in lower.items()}
    med = {m: statistics.median(v) for m, v in whole.items()}
    maoal = get("maoal")
    n_losses, t_steps, lookback = 2, maoal.lower_steps, maoal.lookback
    model = (t_steps * n_losses + n_losses + lookback + 1) / t_steps  # supplement §4: O(N + N/T)
    print(f"\n(c) whole runs on {args.setting}: steps={args.steps} (T={t_steps}: {args.steps // t_steps} upper steps), "
          f"batch={args.batch_size}, repeats={args.repeats}")
    print(f"{'method':<13} {'lower ms':>9} {'x STL':>6} {'whole ms':>9} {'x STL':>6} {'x Equal':>8}")
    for m in names:
        print(f"{m:<13} {med_lo[m] * 1e3:9.2f} {med_lo[m] / med_lo['stl']:6.2f} {med[m] * 1e3:9.2f} "
              f"{med[m] / med['stl']:6.2f} {med[m] / med['equal']:8.2f}")
    print(f"paper's cost model (backward passes, unit = fixed-weight training = Equal), N={n_losses}, T={t_steps}, "
          f"M={lookback}: MAOAL (TN + N + M + 1)/T = {model:.2f}; AuxL (T + M + 2)/T = {(t_steps + lookback + 2) / t_steps:.2f}")


# --- issue 14: the upper step's cost model, counted and timed in a real run ---


def measure_passes(entry: str, setting: str, steps: int, batch_size: int, seed: int, *,
                   n_aux: int | None = None) -> dict[str, float]:
    """One whole run of `entry` with its upper step's passes counted and timed (seconds, totals).

    ``lower``: all lower steps; ``upper``: all upper steps; inside them ``forward`` (the train and
    dev/upper batches' forward passes with their loss terms), ``direction`` (g(θ, φ) with a graph:
    one backward that builds the second-order graph), ``hvp`` (each Jᵀu through that graph: the
    Neumann terms and the power iteration), ``phi_vjp`` (the last product uᵀ ∂g/∂φ, a VJP or the
    method's own `hparam_product`, JTDS's forward-mode pass with its forward), ``power``
    (the `hyper_lr="auto"` power iterations, their products included); ``n_*`` the counts. With
    `n_aux`, the run is `measure_many_tasks`'s (digits + `n_aux` binary tasks) instead of `setting`'s.
    """
    from auxnb import hypergrad, train
    from auxnb.methods import bilevel

    method_cls = type(get(ENTRIES[entry][0]))
    acc = {k: 0.0 for k in ("forward", "direction", "hvp", "power_hvp", "phi_vjp", "power", "upper")}
    n = {k: 0 for k in acc}
    inside = {"upper": False, "power": False}

    clock = train.time.perf_counter  # the Trainer's clock: wall, or CPU time after `use_cpu_clock`

    def timed(key, fn):
        def wrapper(*a, **k):
            _sync()
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                _sync()
                acc[key] += clock() - t0
                n[key] += 1
        return wrapper

    saved = [(hypergrad, "_vjp"), (bilevel, "largest_eigenvalue"), (train, "compute_terms"),
             (method_cls, "direction"), (bilevel.BilevelMethod, "upper_step")]
    originals = [getattr(obj, name) for obj, name in saved]
    vjp, terms, direction, upper_step = hypergrad._vjp, train.compute_terms, method_cls.direction, bilevel.BilevelMethod.upper_step

    def counted_vjp(outputs, inputs, cotangents, **kw):
        # Jᵀu is a product into θ (as many inputs as outputs); uᵀ ∂g/∂φ one into φ
        key = ("power_hvp" if inside["power"] else "hvp") if len(inputs) == len(outputs) else "phi_vjp"
        return timed(key, vjp)(outputs, inputs, cotangents, **kw)

    power_iteration = bilevel.largest_eigenvalue

    def counted_power(*a, **k):
        inside["power"] = True
        try:
            return timed("power", power_iteration)(*a, **k)
        finally:
            inside["power"] = False

    def counted_terms(*a, **k):
        return timed("forward", terms)(*a, **k) if inside["upper"] else terms(*a, **k)

    def counted_direction(self, t, params, *, create_graph=False):
        if create_graph:
            return timed("direction", direction)(self, t, params, create_graph=True)
        return direction(self, t, params, create_graph=False)

    def counted_upper(self, model, context):
        inside["upper"] = True
        try:
            return timed("upper", upper_step)(self, model, context)
        finally:
            inside["upper"] = False

    def counted_product(self, *a, **k):
        # a method's own uᵀ ∂g/∂φ (JTDS's forward-mode pass, `hparam_product`): timed as P, its forward
        # pass included (not counted among F)
        product = hparam_product(self, *a, **k)
        if product is None:
            return None

        def timed_product(u):
            inside["upper"] = False
            try:
                return timed("phi_vjp", product)(u)
            finally:
                inside["upper"] = True

        return timed_product

    hparam_product = method_cls.hparam_product
    saved.append((method_cls, "hparam_product"))
    originals.append(hparam_product)
    hypergrad._vjp, train.compute_terms = counted_vjp, counted_terms
    bilevel.largest_eigenvalue = counted_power
    method_cls.direction, bilevel.BilevelMethod.upper_step = counted_direction, counted_upper
    method_cls.hparam_product = counted_product
    try:
        if n_aux is None:
            lower, _ = measure(entry, setting, steps, batch_size, seed)
        else:
            lower, _ = measure_many_tasks(entry, n_aux, steps, batch_size, seed)
    finally:
        for (obj, name), value in zip(saved, originals):
            setattr(obj, name, value)
    out = {**acc, "lower": lower * steps}
    out.update({f"n_{k}": v for k, v in n.items()})
    return out


def main_cost_model(args) -> None:
    """The upper step's passes per method, in units of one Equal lower step (E), against the measured run."""
    names = [m for m in args.methods.split(",") if m] if args.methods != ",".join(ENTRIES) else ["maoal", "jtds", "dtg"]
    steps = args.steps
    equal: list[float] = []
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in names}
    measure("stl", args.setting, 5, args.batch_size, 0)  # warm-up
    for r in range(args.repeats):
        torch.manual_seed(r)
        equal.append(measure("equal", args.setting, steps, args.batch_size, r)[0])
        for m in names:
            torch.manual_seed(r)
            runs[m].append(measure_passes(m, args.setting, steps, args.batch_size, r))
    e = statistics.median(equal)
    print(f"setting={args.setting} steps={steps} batch={args.batch_size} repeats={args.repeats} threads={args.threads} device={DEVICE}; "
          f"E = one Equal lower step = {e * 1e3:.1f} ms (its whole run per step)")
    print("per upper step, in E: F forward passes (train + dev/upper batch), G the backward that builds g's graph,")
    print("H one Jᵀu product through it, #H/up of them (the Neumann terms), P the last product into φ, #power the")
    print("hyper_lr='auto' power iteration's products in the whole run, rest the upper step's other work (dev loss, φ step)")
    print(f"{'method':<7} {'T':>2} {'lower':>6} {'F':>5} {'G':>5} {'H':>5} {'#H/up':>6} {'P':>5} {'#power':>6} {'rest':>5} "
          f"{'#up':>4} {'model xE':>9} {'measured xE':>12}")
    for m in names:
        med = {k: statistics.median(run[k] for run in runs[m]) for k in runs[m][0]}
        ups = max(med["n_upper"], 1)
        t_steps = get(ENTRIES[m][0], **ENTRIES[m][1]).lower_steps
        hvp_unit = (med["hvp"] + med["power_hvp"]) / max(med["n_hvp"] + med["n_power_hvp"], 1) / e
        lower = med["lower"] / steps / e
        f, g = med["forward"] / ups / e, med["direction"] / ups / e
        p = med["phi_vjp"] / ups / e
        rest = (med["upper"] - med["forward"] - med["direction"] - med["hvp"] - med["phi_vjp"] - med["power"]) / ups / e
        # per lower step: lower + (F + G + #H·H + P + the rest)/T + the power iterations spread over the run
        model = lower + (f + g + med["n_hvp"] / ups * hvp_unit + p + rest) / t_steps + med["n_power_hvp"] * hvp_unit / steps
        measured = (med["lower"] + med["upper"]) / steps / e
        print(f"{m:<7} {t_steps:>2} {lower:6.2f} {f:5.2f} {g:5.2f} {hvp_unit:5.2f} {med['n_hvp'] / ups:6.1f} {p:5.2f} "
              f"{int(med['n_power_hvp']):>6} {rest:5.2f} {int(ups):>4} {model:9.2f} {measured:12.2f}")


def use_cpu_clock() -> None:
    """Make the Trainer's timings (lower_s, upper_s) count this process's CPU time instead of wall time."""
    import time
    import types

    from auxnb import train

    train.time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    train.time.perf_counter = time.process_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(ENTRIES))
    parser.add_argument("--setting", default="digits-rotation")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (the digits settings' runs, the many-task runs)")
    parser.add_argument("--many-tasks", type=int, default=0,
                        help="measure the cost with this many binary auxiliary tasks relative to 1 (JTDS issue 5; CUB has 312)")
    parser.add_argument("--layout", choices=("auto", "per-head", "both"), default="auto",
                        help="with --many-tasks: the heads' layout (issue 23): auto = MultiHeadModel's default (one "
                             "LinearBank from 32 same-shape heads), per-head = one module per head (the layout before), "
                             "both = the two side by side in one run")
    parser.add_argument("--per-loss-grads", action="store_true",
                        help="MAOAL (issue 4): per-loss gradients batched vs looped, and whole runs vs the paper's N + N/T")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what the Trainer's lower_s/upper_s count: wall time, or this process's CPU time "
                             "(steadier on a shared machine, where waiting for a core inflates wall time)")
    parser.add_argument("--cost-model", action="store_true",
                        help="issue 14: count and time the upper step's passes (forward, graph-building backward, "
                             "Hessian-vector products, power iteration) of MAOAL/JTDS/DTG, in Equal lower steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = args.device
    if args.clock == "cpu":
        if DEVICE != "cpu":
            raise SystemExit("--clock cpu counts this process's CPU time, which says nothing of GPU work: use wall time with --device cuda")
        use_cpu_clock()
    global BANK
    BANK = False if args.layout == "per-head" else None
    if args.layout != "auto" and not args.many_tasks:
        raise SystemExit("--layout chooses how the heads of --many-tasks N are stored; add --many-tasks N")
    if args.layout == "both":
        if args.cost_model:
            raise SystemExit("--layout both compares whole runs; for --cost-model run --layout per-head and --layout auto")
        main_layouts(args)
        return
    if args.cost_model and args.many_tasks:
        main_many_tasks_passes(args)
        return
    if args.cost_model:
        main_cost_model(args)
        return
    if args.many_tasks:
        main_many_tasks(args)
        return
    if args.per_loss_grads:
        main_per_loss(args)
        return
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in ENTRIES]
    if unknown:
        raise SystemExit(f"unknown entries {unknown}; known: {', '.join(ENTRIES)}")
    if "stl" not in names:
        names.insert(0, "stl")
    if "equal" not in names:  # the issue's unit, and the guard's second fallback
        names.insert(1, "equal")
    lower: dict[str, list[float]] = {m: [] for m in names}
    whole: dict[str, list[float]] = {m: [] for m in names}
    passes: dict[str, dict[str, int]] = {m: {} for m in names}
    measure("stl", args.setting, 5, args.batch_size, 0)  # warm-up
    for r in range(args.repeats):
        for m in names:
            # the first repeat also counts the backward passes (a Python counter around autograd's calls)
            lo, wh = measure(m, args.setting, args.steps, args.batch_size, r, passes[m] if r == 0 else None)
            lower[m].append(lo)
            whole[m].append(wh)
    base_lo, base_wh = statistics.median(lower["stl"]), statistics.median(whole["stl"])
    # the issue's unit: Equal, which already forwards every auxiliary stream (digits-rotation: 4 rotated copies)
    equal_lo, equal = statistics.median(lower["equal"]), statistics.median(whole["equal"])
    print(f"setting={args.setting} steps={args.steps} batch={args.batch_size} repeats={args.repeats} threads={args.threads} device={DEVICE}")
    print("each method's own run (MAOAL/JTDS/DTG without their do-no-harm guard); 'guarded x Equal': the default,")
    print("guarded run, which also trains STL and Equal on the same steps: (method + STL + Equal) / Equal")
    print("bwd/lower: backward passes per lower step, counted around torch.autograd.grad/backward (a batched call")
    print("counts its cotangents); bwd/up: per upper step (#up of them in the run); bwd/step: the whole run's per step")
    print(f"{'method':<20} {'lower ms':>9} {'x STL':>6} {'x Equal':>8} {'whole ms':>9} {'x STL':>6} {'x Equal':>8} "
          f"{'bwd/lower':>9} {'bwd/up':>7} {'#up':>4} {'bwd/step':>8} {'guarded x Equal':>16}")
    for m in names:
        lo, wh = statistics.median(lower[m]), statistics.median(whole[m])
        guard = guarded(m)
        extra = base_wh + (equal if guard == "stl+equal" else 0.0) if guard else None
        c = passes[m]
        ups = c["upper_steps"]
        per_up = f"{c['upper'] / ups:7.1f}" if ups else f"{'-':>7}"
        print(f"{m:<20} {lo * 1e3:9.2f} {lo / base_lo:6.2f} {lo / equal_lo:8.2f} {wh * 1e3:9.2f} {wh / base_wh:6.2f} "
              f"{wh / equal:8.2f} {c['lower'] / args.steps:9.2f} {per_up} {ups:>4} "
              f"{(c['lower'] + c['upper']) / args.steps:8.2f}"
              + (f" {(wh + extra) / equal:16.2f}" if guard else f" {'':>16}"))


if __name__ == "__main__":
    main()
