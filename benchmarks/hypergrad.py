"""Benchmark auxnb.hypergrad on an MLP of ~100k parameters with 3 auxiliary-loss weights as φ.

Compares, in one process, `implicit_grad` (Neumann, K = 3 and 5) with a hand-written autograd
Neumann loop, Betty's and TorchOpt's implicit differentiation when importable; `per_loss_grads`
batched vs a loop; and a bi-level cycle (T lower steps + one upper step) vs T plain steps.

    python benchmarks/hypergrad.py [--repeats 15] [--batch 128] [--lower-steps 20] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auxnb.hypergrad import implicit_grad, per_loss_grads  # noqa: E402

N_AUX = 3
TORCHOPT = "TorchOpt custom_root (solve_inv ns)"


class Net(nn.Module):
    """Shared trunk, a primary 10-class head and three auxiliary heads (~97k parameters)."""

    def __init__(self, d_in: int = 96, width: int = 256) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleList(
            [nn.Linear(width, 10), nn.Linear(width, 10), nn.Linear(width, 5), nn.Linear(width, 1)]
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def losses(model: Net, batch: dict[str, Tensor]) -> list[Tensor]:
    out = model(batch["x"])
    return [
        F.cross_entropy(out[0], batch["y0"]),
        F.cross_entropy(out[1], batch["y1"]),
        F.cross_entropy(out[2], batch["y2"]),
        F.mse_loss(out[3].squeeze(-1), batch["y3"]),
    ]


def make_batch(n: int, device: torch.device, gen: torch.Generator) -> dict[str, Tensor]:
    x = torch.randn(n, 96, generator=gen)
    return {
        "x": x.to(device),
        "y0": torch.randint(0, 10, (n,), generator=gen).to(device),
        "y1": torch.randint(0, 10, (n,), generator=gen).to(device),
        "y2": torch.randint(0, 5, (n,), generator=gen).to(device),
        "y3": x[:, 0].to(device),
    }


def inner_grads(model: Net, phi: Tensor, batch: dict[str, Tensor], params: tuple[Tensor, ...]):
    ls = losses(model, batch)
    total = ls[0] + (phi * torch.stack(ls[1:])).sum()
    return torch.autograd.grad(total, params, create_graph=True)


def hand_neumann(outer: Tensor, g, params, phi: Tensor, terms: int, lr: float) -> Tensor:
    """The reference: what one would write by hand with torch.autograd.grad."""
    v = torch.autograd.grad(outer, params, allow_unused=True)
    v = [torch.zeros_like(q) if vi is None else vi for vi, q in zip(v, params)]  # auxiliary heads
    p, acc = list(v), list(v)
    for _ in range(terms):
        jp = torch.autograd.grad(g, params, grad_outputs=p, retain_graph=True)
        p = [pi - lr * ji for pi, ji in zip(p, jp)]
        acc = [a + pi for a, pi in zip(acc, p)]
    (h,) = torch.autograd.grad(g, phi, grad_outputs=acc)
    return -lr * h


def torchopt_contender(
    model: Net, params: tuple[Tensor, ...], phi: Tensor, train: dict[str, Tensor], dev: dict[str, Tensor], lr: float
) -> Callable[[int], Tensor] | None:
    """TorchOpt's implicit hypergradient of the dev loss w.r.t. φ, as ``step(K)``; None if not importable.

    ``custom_root`` differentiates through the root of ``g(θ, φ) = ∂L_train/∂θ = 0`` (the fixed
    point of θ ← θ − η·g): ``d dev/dφ = −(∂g/∂φ)ᵀ u`` with ``(∂g/∂θ)ᵀ u = ∂dev/∂θ``, and
    ``solve_inv(ns=True, maxiter=K, alpha=η)`` gives ``u = η·Σ_{i=0..K} (I − η·∂g/∂θ)^i ∂dev/∂θ``,
    the same truncated series as ``implicit_grad(..., terms=K, lr=η)``. TorchOpt evaluates the
    optimality function inside ``functorch.vjp`` on saved, detached tensors during the backward,
    so g must be a functional gradient (``torch.func.grad``); ``torch.autograd.grad`` there sees
    a θ that is not in any autograd graph ("appears to not have been used in the graph").
    """
    try:
        import torchopt  # type: ignore[import-not-found]
        from torch.func import functional_call, grad
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        print(f"   TorchOpt: skipped ({type(err).__name__}: {err})")
        return None
    names = [n for n, _ in model.named_parameters()]

    def train_loss(theta, weights, batch):
        out = functional_call(model, dict(zip(names, theta)), (batch["x"],))
        ls = [
            F.cross_entropy(out[0], batch["y0"]),
            F.cross_entropy(out[1], batch["y1"]),
            F.cross_entropy(out[2], batch["y2"]),
            F.mse_loss(out[3].squeeze(-1), batch["y3"]),
        ]
        return ls[0] + (weights * torch.stack(ls[1:])).sum()

    optimality = grad(train_loss, argnums=0)  # g(θ, φ), a tuple aligned with θ

    def step(k: int) -> Tensor:
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=k, alpha=lr)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solver(theta, weights, batch):
            return theta  # θ is already the (approximate) fixed point: the lower steps ran before

        theta = solver(tuple(p.detach() for p in params), phi, train)
        out = functional_call(model, dict(zip(names, theta)), (dev["x"],))
        return torch.autograd.grad(F.cross_entropy(out[0], dev["y0"]), phi)[0]

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(contenders: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Time each contender ``repeats`` times, interleaved (rotating order) so that load from
    other processes hits all alike. A contender returns a zero-argument callable to time (its
    untimed setup runs first)."""
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = contenders[name]()
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: dict[str, list[float]], ref: str) -> dict[str, tuple[float, float]]:
    """Median time and median of per-repeat ratios against ``ref``, per contender."""
    return {
        name: (statistics.median(ts), statistics.median(t / r for t, r in zip(ts, times[ref])))
        for name, ts in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per measurement (median reported)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lower-steps", type=int, default=20, help="T, lower steps per upper step")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: steadier on a shared CPU; 0: torch's default)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Net().to(device)
    params = tuple(model.parameters())
    phi = torch.ones(N_AUX, device=device, requires_grad=True)
    train, dev = make_batch(args.batch, device, gen), make_batch(args.batch, device, gen)
    lr = 0.1
    n_params = sum(p.numel() for p in params)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"MLP {n_params} parameters, {N_AUX} auxiliary weights, batch {args.batch}, repeats {args.repeats}")

    def setup():
        g = inner_grads(model, phi, train, params)
        outer = losses(model, dev)[0]
        return outer, g

    def given_g(fn: Callable) -> Callable[[], Callable[[], object]]:
        def make():
            state = setup()  # untimed
            return lambda: fn(*state)

        return make

    def whole(fn: Callable) -> Callable[[], Callable[[], object]]:
        return lambda: (lambda: fn(*setup()))

    # warm-up and agreement check
    for terms in (3, 5):
        o, g = setup()
        ref = hand_neumann(o, g, params, phi, terms, lr)
        o, g = setup()
        (ours,) = implicit_grad(o, g, params, (phi,), terms=terms, lr=lr)
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-7), (ours, ref)

    hand = "hand-written autograd loop"
    print("\n1. Hypergradient given g(θ, φ) and the dev loss (graphs built untimed)")
    try:
        from betty.hypergradient.neumann import approx_inverse_hvp  # type: ignore[import-not-found]
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        approx_inverse_hvp = None
        print(f"   Betty: skipped ({type(err).__name__}: {err})")

    def betty(outer, g, k):
        v = torch.autograd.grad(outer, params, allow_unused=True)
        v = [torch.zeros_like(q) if vi is None else vi for vi, q in zip(v, params)]
        u = approx_inverse_hvp(v, g, params, iterations=k, alpha=lr)
        return -torch.autograd.grad(g, phi, grad_outputs=u)[0]

    results = {}
    for terms in (3, 5):
        contenders = {
            hand: given_g(lambda o, g, k=terms: hand_neumann(o, g, params, phi, k, lr)),
            "auxnb implicit_grad": given_g(lambda o, g, k=terms: implicit_grad(o, g, params, (phi,), terms=k, lr=lr)),
        }
        if approx_inverse_hvp is not None:
            contenders["Betty approx_inverse_hvp"] = given_g(lambda o, g, k=terms: betty(o, g, k))
        results[terms] = summary(compare(contenders, args.repeats, device), hand)
    print_table(results)

    print("\n2. Whole upper step (train forward, g, dev forward, hypergradient)")
    with warnings.catch_warnings():
        # TorchOpt 0.7 calls the deprecated functorch.vjp: its FutureWarning, not ours.
        warnings.filterwarnings("ignore", message=r".*functorch", category=FutureWarning)
        torchopt_step = torchopt_contender(model, params, phi, train, dev, lr)
        results, raw = {}, {}
        for terms in (3, 5):
            contenders = {
                hand: whole(lambda o, g, k=terms: hand_neumann(o, g, params, phi, k, lr)),
                "auxnb implicit_grad": whole(
                    lambda o, g, k=terms: implicit_grad(o, g, params, (phi,), terms=k, lr=lr)
                ),
            }
            if torchopt_step is not None:
                # Same quantity: both sum K + 1 Neumann terms (I − η·∂g/∂θ)^i with the same η.
                (ours,) = implicit_grad(*setup(), params, (phi,), terms=terms, lr=lr)
                try:
                    theirs = torchopt_step(terms)
                except Exception as err:  # noqa: BLE001 - report it and time the others
                    print(f"   TorchOpt: failed ({type(err).__name__}: {err})")
                else:
                    rel = ((theirs - ours).abs() / ours.abs()).max().item()
                    print(f"   K={terms}: TorchOpt vs auxnb hypergradient, max relative difference {rel:.2e}")
                    if torch.allclose(theirs, ours, rtol=1e-4, atol=1e-7):
                        contenders[TORCHOPT] = lambda k=terms: (lambda: torchopt_step(k))
                    else:
                        print(f"   TorchOpt: not timed, it disagrees with auxnb: {theirs.tolist()} vs {ours.tolist()}")
            raw[terms] = compare(contenders, args.repeats, device)
            results[terms] = summary(raw[terms], hand)
    print_table(results)
    for terms, times in raw.items():
        if TORCHOPT in times:
            ratio = statistics.median(a / b for a, b in zip(times["auxnb implicit_grad"], times[TORCHOPT]))
            print(f"   K={terms}: auxnb / TorchOpt time, median of per-repeat ratios: {ratio:.3f}")

    print(f"\n3. Per-loss gradients of {N_AUX + 1} losses (first-order)")
    loop = "loop of autograd.grad calls"
    times = compare(
        {
            loop: lambda: (lambda: per_loss_grads(losses(model, train), params, batched=False)),
            "per_loss_grads batched (is_grads_batched)": lambda: (lambda: per_loss_grads(losses(model, train), params)),
        },
        args.repeats,
        device,
    )
    for name, (t, ratio) in summary(times, loop).items():
        print(f"{name:44s}{1e3 * t:9.2f} ms{ratio:9.3f}x")

    steps = args.lower_steps
    print(f"\n4. Bi-level cycle: T={steps} lower steps + 1 upper step, vs {steps} plain steps")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt_phi = torch.optim.Adam([phi], lr=1e-2)

    def lower_step():
        ls = losses(model, train)
        total = ls[0] + (phi.detach() * torch.stack(ls[1:])).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    def plain():
        for _ in range(steps):
            lower_step()

    def cycle(k):
        plain()
        (h,) = implicit_grad(*setup(), params, (phi,), terms=k, lr=lr)
        phi.grad = h
        opt_phi.step()
        phi.grad = None

    base = f"{steps} plain steps"
    times = compare(
        {
            base: lambda: plain,
            f"cycle, K=3 (backward count (T+K+3)/T = {(steps + 6) / steps:.2f})": lambda: (lambda: cycle(3)),
            f"cycle, K=5 (backward count (T+K+3)/T = {(steps + 8) / steps:.2f})": lambda: (lambda: cycle(5)),
        },
        max(5, args.repeats // 2),
        device,
    )
    for name, (t, ratio) in summary(times, base).items():
        print(f"{name:52s}{1e3 * t:9.1f} ms{ratio:9.3f}x")


def print_table(results: dict[int, dict[str, tuple[float, float]]]) -> None:
    """Rows: contenders; columns: median ms and median ratio vs the hand-written loop, per K."""
    header = "".join(f"{f'K={k} ms':>10s}{f'K={k} ratio':>12s}" for k in results)
    print(f"{'':38s}{header}")
    for name in next(iter(results.values())):
        cells = "".join(f"{1e3 * res[name][0]:10.2f}{res[name][1]:11.3f}x" for res in results.values() if name in res)
        print(f"{name:38s}{cells}")


if __name__ == "__main__":
    main()
