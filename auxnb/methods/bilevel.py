"""The bi-level base: the upper step (dev loss -> implicit gradient -> φ optimiser), written once.

A bi-level method only says how its hyper-parameters φ enter the lower direction g(θ, φ),
plus any explicit upper regulariser and projection. The upper step never changes θ or any
model buffer (BatchNorm statistics), and the lower step never builds a second-order graph.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..hypergrad import (HypergradWarning, _norm, check_step, clip_grad_norm_, frozen_buffers, implicit_grad,
                         largest_eigenvalue, solve_neumann)
from ..tasks import PRIMARY_STREAM
from .base import LossTerms, Method, SetupInfo
from .upper import UPPER_DATA, UPPER_FIELDS, UPPER_OPTIMIZERS, UpperLevel, resolve_upper

#: with ``hyper_lr="auto"``, `BilevelMethod.upper_step` warns once (`HypergradWarning`) when a λ_max estimate exceeds
#: this many times the run's first: in ordinary runs it moves within 0.6-3.4× (`benchmarks/lambda_trace.py`); where
#: φ drove the lower problem unstable it grew 10³-10⁹× before the hypergradient overflowed (methods_learn.md §15)
CURVATURE_GROWTH_WARN = 100.0

__all__ = [
    "BilevelMethod", "UpperLevel", "make_upper_optimizer", "upper_context", "UPPER_OPTIMIZERS", "UPPER_DATA", "UPPER_FIELDS",
]


def upper_context(context: Any, upper_data: str) -> Any:
    """The `UpperContext` whose dev batch is a fresh primary training batch when ``upper_data="train"``.

    The batch comes from the Trainer's second shuffled training stream (the one that also feeds
    the upper step's train batch), so it is a different batch from the one g(θ, φ) is built on.
    Like a dev batch it is primary-only and goes through the evaluation transform
    (`UpperContext.primary_train_batch`): no augmentation, no auxiliary stream or view advanced.
    """
    if upper_data == "dev":
        return context
    if upper_data != "train":
        raise ValueError(f"upper_data must be one of {UPPER_DATA}, got {upper_data!r}.")
    primary = getattr(context, "primary_train_batch", None)
    if primary is None:  # a context made by hand, without the Trainer's primary-only stream
        return dataclasses.replace(context, dev_batch=lambda: {PRIMARY_STREAM: context.train_batch()[PRIMARY_STREAM]})
    return dataclasses.replace(context, dev_batch=primary)


def make_upper_optimizer(
    spec: str | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    params: Sequence[nn.Parameter] | Sequence[dict[str, Any]],
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The φ optimiser: ``"adam"``, ``"sgd"`` (with `momentum`) or a callable ``params -> Optimizer``.
    `params` may be torch parameter groups (dicts with their own ``"lr"``, as `DTG`'s ``weight_lr``)."""
    if callable(spec):
        return spec(params)
    if spec == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if spec == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"Unknown upper_optimizer {spec!r}; use 'adam', 'sgd' or a callable params -> Optimizer.")


class BilevelMethod(Method):
    """Base of every bi-level method (AuxL, MAOAL, JTDS, N-JTDS, DTG, Auto-Mix).

    Subclasses create their hyper-parameters in `setup` (calling ``super().setup`` first), return
    them from `hparams`, and implement `direction(terms, params, create_graph)` so that φ
    enters g(θ, φ) with a graph when ``create_graph=True`` (the lower step calls it with
    ``create_graph=False``: first-order, φ detached). Optional: `regulariser` (an explicit
    upper term, e.g. DTG Eq. 14–15) and `project` (e.g. clamp to ≥ 0).

    One upper step (`upper_step`, called by the Trainer every `lower_steps` lower steps):
    a fresh train batch and a dev batch from their own persistent shuffled streams, forwarded
    with every model buffer frozen; g(θ, φ) with a graph; the primary dev loss; its total
    derivative in φ at the fixed point of ``θ <- θ − η·g`` by `auxnb.hypergrad.implicit_grad`
    (JTDS Eq. 7–9, MAOAL supplement Eq. A3–A4); plus the regulariser's gradient; clipped to
    norm `clip`; one step of φ's optimiser; then `project`. θ, its ``.grad`` and the model's
    buffers are left exactly as they were.

    Args:
        upper: the `UpperLevel` (schedule, series, solver, φ optimiser, clipping, refit, upper
            data, dev batches) or a dict of its fields; default: the class's `default_upper`
            (each method's recommendation). Presets: ``UpperLevel.paper_text(method, experiment)``,
            ``UpperLevel.authors(method, experiment)``, ``UpperLevel.recommended(method)``.
        **upper_keywords: any `UpperLevel` field by name (``lower_steps``, ``terms``,
            ``hyper_lr``, ``leading_eta``, ``hypergrad``, ``upper_optimizer``, ``upper_lr``,
            ``upper_momentum``, ``upper_weight_decay``, ``clip``, ``clip_mode``, ``check_every``,
            ``auto_every``, ``auto_target``, ``auto_tol``, ``upper_data``, ``dev_batches``, ``refit``): the
            keywords of earlier versions, which keep working. Precedence: a keyword given
            together with ``upper=`` overrides that field of ``upper``. Any other keyword is a
            ``TypeError`` that lists the fields. Each field is also readable (and settable, which
            replaces `upper`) as an attribute: ``method.upper_lr``.

    What the fields mean is documented on `UpperLevel`; in short: ``hyper_lr`` is η of the
    series ``η·Σ (I − ηJ)^i`` (``"lower"``: the lower optimiser's current learning rate; ``"auto"``:
    `auto_target`/λ_max(J)), which converges only when η·λ_max(J) < 2 (``check_every`` estimates
    λ_max and warns); ``leading_eta=False`` drops the leading η as the authors' code does;
    ``upper_data="train"`` measures the upper objective on fresh training batches (no D_dev is
    carved out); ``dev_in_train=True`` lets θ train on D_dev too, from the first step, while φ is still
    learned from it (auxnb's option: the papers hold D_dev out of θ's training; with it a method's lower
    batches are STL's of the same seed, so paired comparisons share their batches); ``refit=f`` freezes φ
    after f of the run and gives D_dev back to θ (issue 8,
    measured in ``benchmarks/low_data.py`` and the chapter
    ``notebooks/06_when_auxiliary_learning_helps.ipynb``).

    After each upper step `last_upper` holds its diagnostics: ``dev_loss``,
    ``hypergrad_norm`` (before clipping), and ``regulariser`` / ``lambda_max`` when computed.
    """

    name = "bilevel"
    uses_dev = True

    #: the upper level a constructor uses without ``upper=`` (each method's own recommendation)
    default_upper: ClassVar[UpperLevel] = UpperLevel()

    def __init__(self, *, upper: UpperLevel | Mapping[str, Any] | None = None, **upper_keywords: Any):
        self.upper = resolve_upper(type(self).__name__, self.default_upper, upper, upper_keywords)

    @property
    def upper(self) -> UpperLevel:
        """The method's `UpperLevel` (frozen; assign a new one, or set a field: ``m.upper_lr = 0.1``)."""
        return self._upper

    @upper.setter
    def upper(self, value: UpperLevel) -> None:
        if not isinstance(value, UpperLevel):
            raise TypeError(f"upper must be an auxnb.methods.UpperLevel, got {value!r}.")
        self._upper = value
        self.uses_dev = self._runs_upper() and value.upper_data == "dev"

    def _runs_upper(self) -> bool:
        """Whether this configuration takes upper steps at all (DTG without bi-level does not)."""
        return True

    # -- what subclasses provide -------------------------------------------------
    def hparams(self) -> list[nn.Parameter]:
        """φ: the tensors the upper step optimises."""
        raise NotImplementedError

    def regulariser(self, terms: LossTerms) -> Tensor | None:
        """An explicit upper-level term added to the dev loss's gradient (None: none)."""
        return None

    def project(self) -> None:
        """Map φ back to its feasible set after each upper step."""

    def hparam_product(self, model: nn.Module, context: Any, batch: Any, terms: LossTerms, params: Sequence[Tensor],
                       rng: Any) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...] | None] | None:
        """``u -> uᵀ ∂g/∂φ`` by the method's own means for the upper step's last product, or None:
        a VJP through g's graph (`auxnb.hypergrad.implicit_grad`'s ``hparam_product``).

        `batch` and `terms` are the upper step's train batch and its loss terms, `rng` the random
        state right before their forward pass (`rng_snapshot`), so that a second forward pass can
        draw the same dropout masks (`forward_tangents`).
        """
        return None

    def curvature_hint(self) -> str:
        """What of φ may have made the lower problem's curvature run away (a sentence, or ""): added to the
        `HypergradWarning` that `upper_step` gives once when λ_max grows past `CURVATURE_GROWTH_WARN` × its
        first estimate (``hyper_lr="auto"``)."""
        return ""

    # -- the shared machinery ----------------------------------------------------
    @contextmanager
    def upper_generators(self, *names: str) -> Iterator[None]:
        """For the block, each of the method's generator attributes `names` is its upper twin ``<name>_upper``
        (and the twin, advanced, is kept afterwards): a method whose direction draws random numbers of its own
        (DTG's pairings, Auto-Mix's partners) wraps its upper step in this, so that an upper step leaves the
        lower level's draws where they were and an upper step that moves no φ trains θ exactly as no upper
        step (`auxnb.train.Trainer`, ``seed``: common random numbers). Both generators are attributes, so a
        checkpoint keeps both (`auxnb.checkpoint.generator_states`)."""
        lower = {name: getattr(self, name) for name in names}
        for name in names:
            setattr(self, name, getattr(self, f"{name}_upper"))
        try:
            yield
        finally:
            for name in names:
                setattr(self, f"{name}_upper", getattr(self, name))
                setattr(self, name, lower[name])

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        self._upper_steps = 0
        self._auto_eta: float | None = None
        self._lambdas: tuple[float, float] | None = None  # (first, last) λ_max estimate of hyper_lr="auto"
        self._series: tuple[Tensor, ...] | None = None  # the last upper step's u (UpperLevel.warm_start)
        self._series_bound: float | None = None  # and the bound its norm keeps where the series converges
        self._warned_curvature = False
        self._seed = int(info.seed)
        self.last_upper: dict[str, float] = {}
        # a new setup makes new φ tensors: the φ optimiser is rebuilt lazily on them (an old
        # one would keep stepping the previous run's tensors and carry its moments over)
        self._upper_opt: torch.optim.Optimizer | None = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        u = self.upper
        return make_upper_optimizer(u.upper_optimizer, self.hparams(), u.upper_lr, u.upper_momentum, u.upper_weight_decay)

    @property
    def upper_opt(self) -> torch.optim.Optimizer:
        """φ's optimiser, built on first use over the current `hparams`."""
        if getattr(self, "_upper_opt", None) is None:
            self._upper_opt = self._make_optimizer()
        return self._upper_opt

    def upper_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """One upper step: hypergradient of the primary dev loss w.r.t. φ, clipped, one φ step.

        `context` is a `auxnb.train.UpperContext`. Returns (and keeps in `last_upper`) the
        step's diagnostics. Raises ``FloatingPointError`` instead of stepping φ when the
        hypergradient is not finite (typically a diverging Neumann series: η·λ_max ≥ 2).
        """
        return self._upper_step(model, context, series_only=False)

    def series_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """An upper step that only advances the warm-started series (`UpperLevel.warm_start` > 0): u is solved
        and kept as in `upper_step` (the same batches drawn, λ_max estimated on the same schedule), but the
        product into φ is not taken and φ does not move. A method whose φ waits (JTDS's ``warmup``) uses it to
        enter its first φ update with the series' horizon already built. ``info["series_only"] = 1``."""
        if not self.upper.warm_start:  # (UpperLevel already refuses warm_start with any hypergrad but "neumann")
            raise ValueError(f"{type(self).__name__}.series_step advances the warm-started Neumann series; it needs "
                             f"warm_start > 0 (got {self.upper.warm_start}): a cold series keeps nothing between steps.")
        return self._upper_step(model, context, series_only=True)

    def _upper_step(self, model: nn.Module, context: Any, series_only: bool) -> dict[str, float]:
        hparams = self.hparams()
        tasks = context.tasks
        params = tuple(context.params)
        context = upper_context(context, self.upper_data)
        info: dict[str, float] = {}
        with frozen_buffers(model):
            train_batch = context.train_batch()
            rng = rng_snapshot(params[0].device if params else None)
            train_terms = context.terms(train_batch, names=self.task_names(tasks))
            inner = self.direction(train_terms, params, create_graph=True)
            if self.hyper_lr == "auto":
                if self._auto_eta is None or self._upper_steps % self.auto_every == 0:
                    gen = torch.Generator().manual_seed(self._seed + 104_729 * self._upper_steps)
                    # from the lower direction g (a network's top curvature directions dominate it): 6-9
                    # products to within a few per cent where a random start took all 20 (issue 22's cost)
                    lam = abs(largest_eigenvalue(inner, params, generator=gen, tol=self.upper.auto_tol,
                                                 start=tuple(g.detach() for g in inner)))
                    info["lambda_max"] = lam
                    # a flat J (λ≈0) leaves the previous η, or the lower learning rate at first
                    if lam > 0 and math.isfinite(lam):
                        self._auto_eta = self.auto_target / lam
                        first = self._lambdas[0] if self._lambdas else lam
                        self._lambdas = (first, lam)
                        if lam > CURVATURE_GROWTH_WARN * first and not self._warned_curvature:
                            self._warned_curvature = True
                            warnings.warn(
                                f"{type(self).__name__}: λ_max(J) = {lam:.3g} at upper step {self._upper_steps} (lower step "
                                f"{context.step}), {lam / first:.0f}× its first estimate ({first:.3g}): the lower problem's "
                                "curvature is running away, and from here on the hypergradient (its norm before clipping: "
                                "trace()['upper/hypergrad_norm']) says more about that than about φ. "
                                f"{self.curvature_hint()}Slow φ down (a smaller upper_lr) or freeze it (upper_lr=0).",
                                HypergradWarning, stacklevel=3)
                    elif self._auto_eta is None:
                        self._auto_eta = float(context.lr)
                eta = float(self._auto_eta)
            else:
                eta = context.lr if self.hyper_lr == "lower" else float(self.hyper_lr)
            info["hyper_lr"] = eta
            outer = sum(
                context.terms(context.dev_batch(), names=[tasks.primary.name]).mean(tasks.primary.name)
                for _ in range(self.dev_batches)
            ) / self.dev_batches
            info["dev_loss"] = float(outer.detach())
            if not eta > 0:
                # η = the lower learning rate, annealed to 0 (hyper_lr="lower" at the end of a cosine
                # schedule): θ no longer moves, so φ has no effect on it; φ is left as it is
                info["hypergrad_norm"] = 0.0
                self._upper_steps += 1
                self.last_upper = info
                return info
            if self.check_every and self._upper_steps % self.check_every == 0:
                info["lambda_max"] = check_step(inner, params, eta)
            reg = None if series_only else self.regulariser(train_terms)
            reg_grads = None
            if reg is not None:
                reg_grads = torch.autograd.grad(reg, hparams, retain_graph=True, allow_unused=True)
                info["regulariser"] = float(reg.detach())
            if series_only:  # u is what this step is for: no product into φ (zeros instead of Jᵀu's last VJP)
                def product(u: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                    return tuple(torch.zeros_like(h) for h in hparams)
            else:
                product = self.hparam_product(model, context, train_batch, train_terms, params, rng)
                if self.upper.phi_batches > 1:
                    product = self._averaged_product(model, context, product, inner, params, hparams, tasks)
            solver = self.hypergrad
            if self.upper.warm_start:
                solver = self._keeping_series(eta, info)
            grads = implicit_grad(outer, inner, params, hparams, method=solver, terms=self.terms, lr=eta,
                                  hparam_product=product)
            if series_only:
                info["series_only"] = 1.0
                self._upper_steps += 1
                self.last_upper = info
                return info
            if not self.upper.leading_eta:
                # the authors' code: Σ (I − ηJ)^i without the leading η, i.e. 1/η times the series
                grads = tuple(g / eta for g in grads)
        if reg_grads is not None:
            grads = tuple(g if r is None else g + r for g, r in zip(grads, reg_grads))
        if self.clip is not None:
            grads, norm = clip_grad_norm_(grads, self.clip, exact=self.clip_mode == "fixed")
        else:
            # at least float32 (half-precision φ), never below φ's own precision
            norm = float(torch.sqrt(sum((g.float() if g.dtype in (torch.float16, torch.bfloat16) else g).pow(2).sum() for g in grads)))
        info["hypergrad_norm"] = float(norm)
        if not math.isfinite(info["hypergrad_norm"]):
            where = f"Non-finite hypergradient at upper step {self._upper_steps} (lower step {context.step})"
            if self.hyper_lr == "auto" and self._lambdas is not None:
                # η = auto_target / λ_max held η·λ_max < 2 when λ_max was estimated: the curvature rose since
                first, last = self._lambdas
                raise FloatingPointError(
                    f"{where} with hyper_lr='auto' (η = {eta:.3g}): λ_max(J) was {last:.4g} at its last estimate "
                    f"({first:.4g} at the first), so the lower problem's curvature has grown past 2/η since, or its "
                    f"losses overflowed: the lower training is becoming unstable. Estimate λ_max more often "
                    f"(auto_every, now {self.auto_every}), slow φ down (a smaller upper_lr), or lower the learning rate."
                )
            raise FloatingPointError(f"{where}; lower hyper_lr (now {eta}) so that hyper_lr·λ_max(J) < 2, or use fewer terms.")
        opt = self.upper_opt
        opt.zero_grad(set_to_none=True)
        for h, g in zip(hparams, grads):
            h.grad = g.detach().to(h.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.project()
        self._upper_steps += 1
        self.last_upper = info
        return info

    def _keeping_series(self, eta: float, info: dict[str, float]) -> Callable:
        """The warm-started solver (`UpperLevel.warm_start`), which keeps its solution for the next upper step.

        Its K iterations start from β·(the last upper step's u), so the series keeps what it summed before (θ has
        moved T lower steps since, J and v with it: the old part is an approximation, which β forgets).

        Where ηJ is symmetric with eigenvalues in [0, 2] (the series converges), ‖(I − ηJ)^K s‖ ≤ ‖s‖, so the warm
        solutions obey ‖u_t‖ ≤ m_t with m_t = β·m_{t−1} + (K + 1)·η_t·‖v_t‖ (the series' bound, kept beside u). A
        solution above 2·m_t, or not finite, means the carried part is growing — the curvature has passed 2/η
        since λ_max was estimated, or negative curvature compounds across upper steps, which a cold series of K
        terms would not let grow — and the step is solved afresh from 0 instead (K more products; the bound starts
        again; ``info["series_restart"] = 1``)."""
        terms, beta = self.terms, self.upper.warm_start
        start = None if self._series is None else tuple(beta * t for t in self._series)

        def norm(ts: tuple[Tensor, ...]) -> float:
            return float(_norm(tuple(t.double() for t in ts)))

        def run(matvec: Callable, b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            fresh = (terms + 1) * eta * norm(b)
            u = tuple(solve_neumann(terms, eta, start=start)(matvec, b))
            bound = fresh if start is None or self._series_bound is None else beta * self._series_bound + fresh
            if start is not None:
                size = norm(u)
                if not (math.isfinite(size) and size <= 2 * bound):
                    u = tuple(solve_neumann(terms, eta)(matvec, b))
                    bound = fresh
                    info["series_restart"] = 1.0
            self._series = tuple(t.detach().clone() for t in u)
            self._series_bound = bound
            return u
        return run

    def _averaged_product(self, model: nn.Module, context: Any, product: Callable | None, inner: tuple[Tensor, ...],
                          params: tuple[Tensor, ...], hparams: Sequence[Tensor], tasks: Any) -> Callable:
        """``u -> uᵀ ∂g/∂φ`` averaged over the upper step's train batch and ``phi_batches − 1`` more from the
        upper level's training stream (`UpperLevel.phi_batches`). Each batch's product is the method's own
        (`hparam_product`) where it has one and a VJP through that batch's g otherwise; u (the series, from
        the first batch's J and the dev loss) is shared, so the estimate is of the same uᵀ E[∂g/∂φ] with
        less of one batch's sampling noise in it (the weights of 64 samples decide a loss filter's slope)."""
        names = self.task_names(tasks)

        def vjp(g: tuple[Tensor, ...], retain: bool) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]:
            def run(u: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                out = torch.autograd.grad(g, list(hparams), grad_outputs=u, retain_graph=retain, allow_unused=True)
                return tuple(torch.zeros_like(h) if o is None else o for h, o in zip(hparams, out))
            return run

        parts: list[tuple[Callable | None, Callable[[], Callable]]] = [(product, lambda: vjp(inner, False))]
        for _ in range(self.upper.phi_batches - 1):
            batch = context.train_batch()
            rng = rng_snapshot(params[0].device if params else None)
            terms = context.terms(batch, names=names)
            own = self.hparam_product(model, context, batch, terms, params, rng)
            # the VJP's g is built only when needed (no method product, or it gave up on this model)
            parts.append((own, lambda terms=terms: vjp(self.direction(terms, params, create_graph=True), False)))

        def averaged(u: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            total: list[Tensor] | None = None
            for own, fallback in parts:
                got = own(u) if own is not None else None
                got = fallback()(u) if got is None else got
                total = list(got) if total is None else [t + g for t, g in zip(total, got)]
            assert total is not None
            return tuple(t / len(parts) for t in total)

        return averaged

    def trace(self) -> dict[str, Any]:
        """The last upper step's diagnostics as ``upper/<name>`` (subclasses add φ's state)."""
        return {f"upper/{k}": v for k, v in getattr(self, "last_upper", {}).items()}

    def config(self) -> dict[str, Any]:
        """Constructor arguments: the method's own, ``upper`` (`UpperLevel.to_dict`, JSON values) and,
        for configs written before `UpperLevel`, the same fields flat (``config()["hyper_lr"]``)."""
        # the last upper step's diagnostics are state, not config
        own = {k: v for k, v in super().config().items() if k != "last_upper"}
        upper = self.upper.to_dict()
        return {**own, **upper, "lower_steps": self.lower_steps, "upper": upper}

    def __repr__(self) -> str:
        own = {k: v for k, v in self.config().items() if k not in UPPER_FIELDS and k != "upper"}
        args = ", ".join([*(f"{k}={v!r}" for k, v in own.items()), f"upper={self.upper!r}"])
        return f"{type(self).__name__}({args})"

    def state_dict(self) -> dict[str, Any]:
        return {
            "hparams": [h.detach().clone() for h in self.hparams()],
            "upper_opt": self.upper_opt.state_dict(),
            "upper_steps": self._upper_steps,
            "auto_eta": self._auto_eta,
            "lambdas": self._lambdas,
            "last_upper": dict(self.last_upper),
            "series": None if self._series is None else [t.clone() for t in self._series],
            "series_bound": self._series_bound,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        hparams = self.hparams()
        saved = list(state["hparams"])
        shapes = [tuple(h.shape) for h in hparams]
        if [tuple(t.shape) for t in saved] != shapes:
            raise ValueError(
                f"Saved {type(self).__name__} state has hyper-parameters of shapes {[tuple(t.shape) for t in saved]} "
                f"but this method has {shapes}; resume with the same method configuration, tasks and partition."
            )
        with torch.no_grad():
            for h, value in zip(hparams, saved):
                h.copy_(value)
        self.upper_opt.load_state_dict(state["upper_opt"])
        self._upper_steps = int(state["upper_steps"])
        self._auto_eta = state.get("auto_eta")
        lambdas = state.get("lambdas")  # absent in checkpoints written before 2026-12-07
        self._lambdas = None if lambdas is None else (float(lambdas[0]), float(lambdas[1]))
        self.last_upper = dict(state.get("last_upper", {}))
        series = state.get("series")  # absent before warm_start (2026-12-07): a cold series, as those runs had
        device = hparams[0].device if hparams else None
        self._series = None if series is None else tuple(t.to(device) for t in series)
        self._series_bound = state.get("series_bound")


def rng_snapshot(device: torch.device | None) -> tuple[Tensor, Tensor | None, torch.device | None]:
    """The global random state (CPU, and `device`'s when it is a CUDA device) for `forward_tangents`."""
    cuda = device is not None and device.type == "cuda"
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if cuda else None), (device if cuda else None)


def with_parameters(model: nn.Module, tensors: Mapping[str, Tensor], fn: Callable[[], Any]) -> Any:
    """``fn()`` with `model`'s parameters named in `tensors` (``model.named_parameters()`` names) replaced by
    those tensors for the call (``torch.func.functional_call``); `fn` may call the model, or any method of it,
    any number of times. The model's own tensors are untouched."""
    from torch.func import functional_call

    class _Call(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self) -> Any:
            return fn()

    return functional_call(_Call(), {f"model.{name}": t for name, t in tensors.items()}, (), strict=False)


def forward_tangents(model: nn.Module, params: Sequence[Tensor], tangents: Sequence[Tensor], fn: Callable[[], Any],
                     *, rng: tuple[Tensor, Tensor | None, torch.device | None] | None = None) -> list[Tensor | None]:
    """The directional derivatives along ``θ + ε·u`` of the tensors `fn()` returns: one forward-mode pass.

    `fn` runs `model` (any number of times) and returns a tensor or a sequence of tensors; while it
    runs, each of `model`'s parameters in `params` carries the tangent at the same position of
    `tangents` (forward-mode AD, ``torch.autograd.forward_ad``), the others none. Returns each
    output's tangent, ``d fn(θ + ε·u)/dε`` at ε = 0 (None where an output does not depend on
    `params`). No backward graph is built, the model's own tensors are untouched, and with `rng`
    (`rng_snapshot` taken before an earlier forward pass) the pass draws that pass's random numbers
    (dropout) and leaves the global random state as it found it. Buffers (BatchNorm statistics)
    are updated as by any forward pass: call it inside `auxnb.hypergrad.frozen_buffers`.

    Raises ``RuntimeError`` / ``NotImplementedError`` from PyTorch when an operation in the model
    has no forward-mode derivative.
    """
    import torch.autograd.forward_ad as fwad

    by_id = {id(p): t for p, t in zip(params, tangents)}
    named = [(name, p) for name, p in model.named_parameters() if id(p) in by_id]

    devices = [] if rng is None or rng[2] is None else [rng[2]]
    with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=rng is not None), fwad.dual_level():
        if rng is not None:
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], rng[2])
        duals = {name: fwad.make_dual(p.detach(), by_id[id(p)].to(p.dtype)) for name, p in named}
        out = with_parameters(model, duals, fn)
        single = isinstance(out, Tensor)
        tangents_out = [fwad.unpack_dual(t).tangent for t in ([out] if single else out)]
    return tangents_out


def _upper_field(name: str) -> property:
    def get(self: BilevelMethod) -> Any:
        return getattr(self.upper, name)

    def set_(self: BilevelMethod, value: Any) -> None:
        self.upper = self.upper.replace(**{name: value})

    return property(get, set_, doc=f"``upper.{name}`` (see `UpperLevel`); setting it replaces `upper`.")


for _name in UPPER_FIELDS:
    setattr(BilevelMethod, _name, _upper_field(_name))


def _lower_steps(self: BilevelMethod) -> int | None:
    # None when this configuration takes no upper step (the Trainer then never calls upper_step)
    return self.upper.lower_steps if self._runs_upper() else None


BilevelMethod.lower_steps = property(_lower_steps, BilevelMethod.lower_steps.fset, doc=BilevelMethod.lower_steps.__doc__)
