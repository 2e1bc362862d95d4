"""Hypergradients of bi-level problems by implicit differentiation, over tuples of tensors.

Pure functions: they take losses, gradients and tensors and return new tensors. They must never
write ``.grad``, optimiser state or the global RNG, must leave model buffers as they found them, and
know nothing of models or methods (a method only builds ``g(θ, φ)``; see :func:`implicit_grad`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "DoubleBackwardError",
    "HypergradWarning",
    "Matvec",
    "Solver",
    "Tensors",
    "check_step",
    "clip_grad_norm_",
    "frozen_buffers",
    "implicit_grad",
    "is_symmetric",
    "largest_eigenvalue",
    "per_loss_grads",
    "smallest_eigenvalue",
    "solve_cg",
    "solve_neumann",
]

Tensors = tuple[Tensor, ...]
#: ``matvec(u) -> A u`` over tuples of tensors aligned with the parameters.
Matvec = Callable[[Tensors], Tensors]
#: A linear solver ``(matvec, b) -> x`` with ``A x ≈ b`` (TorchOpt's convention).
Solver = Callable[[Matvec, Tensors], Tensors]

METHODS = ("neumann", "exact", "cg")
_DEFAULT_MAX_PARAMS = 5000
_SOLVER_KEYS: dict[str, frozenset[str]] = {
    "neumann": frozenset({"check_graph"}),
    "exact": frozenset({"check_graph", "max_params", "chunk_size"}),
    "cg": frozenset({"check_graph", "maxiter", "tol", "check_symmetry", "probes", "rtol", "generator"}),
    "custom": frozenset({"check_graph"}),
}


class DoubleBackwardError(RuntimeError):
    """An op in the graph of ``g(θ, φ)`` has no double backward (second derivative)."""


class HypergradWarning(UserWarning):
    """The hypergradient is likely wrong (e.g. the Neumann series diverges)."""


# --------------------------------------------------------------------------- helpers


def _as_tuple(tensors: Tensor | Sequence[Tensor], what: str) -> Tensors:
    if isinstance(tensors, Tensor):
        return (tensors,)
    out = tuple(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected a Tensor")
    return out


def _dot(a: Tensors, b: Tensors) -> Tensor:
    """Sum of elementwise products over two aligned tuples, as a 0-dim tensor."""
    if not a:
        return torch.zeros(())
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()


def _norm(a: Tensors) -> Tensor:
    if not a:
        return torch.zeros(())
    # one call for every tensor's norm (the same kernel per tensor as linalg.vector_norm, so the
    # same bits) instead of a Python loop: it matters with hundreds of parameter tensors (312 heads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(a))))


def _axpy(alpha: float | Tensor, x: Tensors, y: Tensors) -> Tensors:
    """``y + alpha * x`` elementwise over aligned tuples (``alpha`` a number or a 0-dim tensor).

    By ``torch._foreach_*`` ops: the same elementwise arithmetic per tensor as ``torch.add`` (same
    bits), without a Python loop over the tensors.
    """
    if not x:
        return ()
    if isinstance(alpha, Tensor):
        return tuple(torch._foreach_add(list(y), torch._foreach_mul(list(x), alpha)))
    return tuple(torch._foreach_add(list(y), list(x), alpha=alpha))


def _scale(a: Tensors, factor: float) -> Tensors:
    """``factor * t`` for every tensor (``torch._foreach_mul``: the same bits as the loop)."""
    return tuple(torch._foreach_mul(list(a), factor)) if a else ()


def _zeros_for(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensors:
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like))


def _random_like(tensors: Tensors, generator: torch.Generator | None) -> Tensors:
    """Standard-normal tensors shaped like ``tensors``; never consumes the global RNG."""
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    return tuple(
        torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device).to(t.device)
        for t in tensors
    )


# Every @once_differentiable backward shares one wrapper code object.
_ONCE_DIFFERENTIABLE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__
_NOT_IMPLEMENTED_PATTERNS = (
    re.compile(r"derivative for '?([\w:.]+?)'? is not implemented", re.IGNORECASE),
    re.compile(
        r"([\w:.]+?)[: ]+(?:double backwards?|second[- ]order \w+) (?:is|are) not (?:supported|implemented)",
        re.IGNORECASE,
    ),
)
_DOUBLE_BACKWARD_HINTS = (
    "once_differentiable",
    "differentiate twice",
    "double backward",
    "is not implemented",
    "not differentiable twice",
)


def _graph_nodes(roots: Sequence[Tensor]) -> Iterator[object]:
    """Every autograd node reachable from the ``grad_fn`` of ``roots`` (each once)."""
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[object] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


def _once_differentiable_names(roots: Sequence[Tensor]) -> list[str]:
    """Names of custom autograd.Functions with a @once_differentiable backward in a graph."""
    names = []
    for node in _graph_nodes(roots):
        cls = getattr(node, "_forward_cls", None)
        code = getattr(getattr(cls, "backward", None), "__code__", None)
        if code is _ONCE_DIFFERENTIABLE_CODE and cls.__name__ not in names:
            names.append(cls.__name__)
    return names


def _double_backward_message(op: str) -> str:
    return (
        f"op {op} has no double backward (second derivative), which the implicit "
        "hypergradient needs to differentiate inner_grads = g(θ, φ). Options: a first-order "
        "approximation (implicit_grad(..., terms=0), with g built as a φ-weighted sum of "
        "first-order per-loss gradients, see per_loss_grads), or replace the op with one "
        "that is twice differentiable."
    )


def _check_graph(inner_grads: Tensors, extra_roots: Sequence[Tensor]) -> None:
    """Raise DoubleBackwardError when g was built through a @once_differentiable backward.

    Such a backward silently cuts the dependence of g on θ and φ (autograd then reports the
    inputs as unused), so it must be caught before any VJP rather than from an exception.
    """
    for node in _graph_nodes(inner_grads):
        if node.name() == "torch::autograd::Error":
            names = _once_differentiable_names([*extra_roots, *inner_grads])
            found = ", ".join(repr(n) for n in names) + " (an autograd.Function" if names else "'<autograd.Function"
            raise DoubleBackwardError(_double_backward_message(f"{found} with a @once_differentiable backward)"))


def _translate(err: BaseException) -> DoubleBackwardError | None:
    """A DoubleBackwardError for autograd errors caused by a missing double backward."""
    msg = str(err)
    low = msg.lower()
    if not any(h in low for h in _DOUBLE_BACKWARD_HINTS):
        return None
    if "is not implemented" in low and "derivative" not in low and "backward" not in low:
        return None
    for pattern in _NOT_IMPLEMENTED_PATTERNS:
        match = pattern.search(msg)
        if match:
            op = repr(match.group(1))
            break
    else:
        op = "'<autograd.Function with a @once_differentiable backward>'" if "once" in low else "'<unknown>'"
    return DoubleBackwardError(f"{_double_backward_message(op)} (autograd said: {msg.strip()})")


def _vjp(
    outputs: Tensors, inputs: Tensors, cotangents: Tensors, *, retain_graph: bool, unused: list[int] | None = None
) -> Tensors:
    """``cotangentsᵀ · ∂outputs/∂inputs``; zeros for unused inputs; missing double backwards named.

    With `unused` (a list), the indices of the inputs that no output's graph reaches are appended to it.
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        if unused is not None:
            unused.extend(range(len(inputs)))
        return tuple(torch.zeros_like(t) for t in inputs)
    try:
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            inputs,
            grad_outputs=[c for _, c in pairs],
            retain_graph=retain_graph,
            allow_unused=True,
        )
    except (RuntimeError, NotImplementedError) as err:
        translated = _translate(err)
        if translated is not None:
            raise translated from err
        if "second time" in str(err):
            raise RuntimeError(
                f"{err}\n(auxnb.hypergrad: implicit_grad frees the graph of inner_grads by default; "
                "rebuild inner_grads for each call or pass retain_graph=True)"
            ) from err
        raise
    if unused is not None:
        unused.extend(i for i, g in enumerate(grads) if g is None)
    return _zeros_for(grads, inputs)


def _transpose_matvec(inner_grads: Tensors, params: Tensors) -> Matvec:
    """``u -> Jᵀ u`` (= ``(uᵀ J)ᵀ``, one VJP) for ``J = ∂g/∂θ``; keeps the graph."""

    def matvec(u: Tensors) -> Tensors:
        return _vjp(inner_grads, params, u, retain_graph=True)

    return matvec


def _validate(inner_grads: Tensors, params: Tensors) -> None:
    if len(inner_grads) != len(params):
        raise ValueError(
            f"inner_grads has {len(inner_grads)} tensors but params has {len(params)}; they must be aligned"
        )
    for i, (g, p) in enumerate(zip(inner_grads, params)):
        if g.shape != p.shape:
            raise ValueError(
                f"inner_grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(p.shape)}"
            )
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad; the fixed point is taken over θ, so it must")
    if inner_grads and not any(g.requires_grad for g in inner_grads):
        raise ValueError(
            "no tensor in inner_grads carries an autograd graph: build g(θ, φ) with "
            "torch.autograd.grad(..., create_graph=True). (If you did, an op's backward in the "
            "model returned a gradient without a graph, i.e. it has no double backward.)"
        )


# --------------------------------------------------------------------------- solvers


def solve_neumann(terms: int = 3, lr: float = 1.0, start: Tensors | None = None) -> Solver:
    """A solver ``(matvec, b) -> x`` with ``x = lr · Σ_{i=0..terms} (I − lr·A)^i b ≈ A⁻¹ b``.

    The truncated Neumann series (JTDS Eq. 8 with an explicit step size); it converges to
    ``A⁻¹ b`` when every eigenvalue λ of ``A`` has ``|1 − lr·λ| < 1`` (for symmetric positive
    definite ``A``: ``lr·λ_max < 2``). ``terms = K`` uses ``K`` matvecs and ``K + 1`` summands.

    The partial sums are the Richardson iterates ``x ← x + lr·(b − A x)`` from ``x = 0``. With
    `start` (a warm start, e.g. an earlier solution) the ``K`` iterations run from ``x = start``
    instead: ``x = (I − lr·A)^K start + lr · Σ_{i<K} (I − lr·A)^i b``, still ``K`` matvecs. Fed its
    own result, call after call, on one ``A`` and ``b``, that is the series with ``K`` more terms each
    call (`UpperLevel.warm_start`).

    Args:
        terms: number of matvecs ``K ≥ 0``; ``0`` gives the first-order ``x = lr·b`` (or `start`).
        lr: step size ``lr > 0``.
        start: where the iterations start, shaped like ``b``; None: the series from 0.

    Returns:
        A function ``(matvec, b) -> x`` over tuples of tensors.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> solver = solve_neumann(terms=60, lr=0.5)
        >>> (x,) = solver(lambda u: (A @ u[0],), (torch.tensor([2.0, 1.0]),))
        >>> [round(v, 4) for v in x.tolist()]
        [1.0, 1.0]
    """
    if isinstance(terms, bool) or not isinstance(terms, numbers.Integral) or terms < 0:
        raise ValueError(f"terms must be an integer >= 0, got {terms!r}")
    terms = int(terms)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")

    def solve(matvec: Matvec, b: Tensors) -> Tensors:
        p = tuple(b)
        acc = tuple(b)
        for _ in range(terms):
            p = _axpy(-lr, matvec(p), p)  # p <- (I - lr A) p
            acc = _axpy(1.0, p, acc)
        return _scale(acc, lr)

    def solve_from(matvec: Matvec, b: Tensors) -> Tensors:
        x = tuple(start)  # type: ignore[arg-type]
        if len(x) != len(b) or any(a.shape != c.shape for a, c in zip(x, b)):
            raise ValueError(f"start must be shaped like b: got {[tuple(a.shape) for a in x]} for {[tuple(c.shape) for c in b]}")
        for _ in range(terms):
            r = _axpy(-1.0, matvec(x), b)  # b − A x
            x = _axpy(lr, r, x)
        return x

    return solve if start is None else solve_from


def solve_cg(maxiter: int = 100, tol: float = 1e-6) -> Solver:
    """A solver ``(matvec, b) -> x`` by conjugate gradients; ``A`` must be symmetric positive definite.

    Raises ``ValueError`` when it meets a direction of non-positive curvature (``A`` not positive
    definite). When it stops after `maxiter` matvecs with ``‖b − A x‖ > tol · ‖b‖`` it returns
    that inexact ``x`` with a :class:`HypergradWarning` that gives the relative residual. After
    each call the solver's ``info`` attribute holds ``{"iterations", "residual", "converged"}``
    (``residual`` relative to ``‖b‖``).

    Args:
        maxiter: most matvecs.
        tol: stop when ``‖b − A x‖ ≤ tol · ‖b‖``.

    Returns:
        A function ``(matvec, b) -> x`` over tuples of tensors.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> solver = solve_cg(tol=1e-12)
        >>> (x,) = solver(lambda u: (A @ u[0],), (b,))
        >>> torch.allclose(A @ x, b), solver.info["converged"], solver.info["iterations"]
        (True, True, 2)
    """
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter!r}")

    def solve(matvec: Matvec, b: Tensors) -> Tensors:
        b = tuple(b)
        x = tuple(torch.zeros_like(t) for t in b)
        r = b
        d = r
        rs = _dot(r, r)
        b_norm = math.sqrt(float(rs))
        threshold = tol * b_norm
        iterations = 0
        for _ in range(maxiter):
            if math.sqrt(float(rs)) <= threshold or float(rs) == 0.0:
                break
            ad = matvec(d)
            curvature = _dot(d, ad)
            if float(curvature) <= 0.0:
                raise ValueError(
                    "conjugate gradients met a direction of non-positive curvature: J is not "
                    "positive definite here; use method='neumann' or 'exact'"
                )
            alpha = rs / curvature
            x = _axpy(alpha, d, x)
            r = _axpy(-alpha, ad, r)
            rs_next = _dot(r, r)
            d = _axpy(rs_next / rs, d, r)
            rs = rs_next
            iterations += 1
        residual = math.sqrt(float(rs))
        converged = residual <= threshold or residual == 0.0
        relative = residual / b_norm if b_norm > 0 else 0.0
        solve.info = {"iterations": iterations, "residual": relative, "converged": converged}  # type: ignore[attr-defined]
        if not converged:
            warnings.warn(
                f"conjugate gradients did not converge: after {iterations} matvecs (maxiter={maxiter}) the "
                f"relative residual ‖b − Ax‖/‖b‖ is {relative:.3g} > tol={tol:g}, so the returned solution (and "
                "the hypergradient) is inexact; raise maxiter (solver_kwargs={'maxiter': ...}) or loosen tol",
                HypergradWarning,
                stacklevel=2,
            )
        return x

    solve.info = {}  # type: ignore[attr-defined]
    return solve


def _dense_jacobian(inner_grads: Tensors, params: Tensors, chunk_size: int) -> Tensor:
    """``J = ∂g/∂θ`` as an ``n × n`` matrix: row ``i`` is ``e_iᵀ J``, by batched VJPs (loop fallback)."""
    sizes = [g.numel() for g in inner_grads]
    n = sum(sizes)
    ref = params[0]
    live = [i for i, g in enumerate(inner_grads) if g.requires_grad]
    matvec = _transpose_matvec(inner_grads, params)
    blocks = []
    for start in range(0, n, chunk_size):
        rows = min(n, start + chunk_size) - start
        eye = torch.zeros(rows, n, dtype=ref.dtype, device=ref.device)
        eye[torch.arange(rows), torch.arange(start, start + rows)] = 1.0
        cotangents = [c.reshape(rows, *g.shape) for c, g in zip(eye.split(sizes, dim=1), inner_grads)]
        try:
            grads = torch.autograd.grad(
                [inner_grads[i] for i in live],
                params,
                grad_outputs=[cotangents[i] for i in live],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            block = torch.cat(
                [ref.new_zeros(rows, p.numel()) if g is None else g.reshape(rows, -1) for g, p in zip(grads, params)],
                dim=1,
            )
        except (RuntimeError, NotImplementedError):
            # vmap could not batch an op: one VJP per row (which names a missing double backward).
            block = torch.stack(
                [
                    torch.cat([t.reshape(-1) for t in matvec(tuple(c[r] for c in cotangents))])
                    for r in range(rows)
                ]
            )
        blocks.append(block)
    return torch.cat(blocks, dim=0)


# --------------------------------------------------------------------------- diagnostics


def is_symmetric(
    inner_grads: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    probes: int = 2,
    rtol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> bool:
    """Whether ``J = ∂g/∂θ`` looks symmetric, by comparing ``uᵀJw`` with ``wᵀJu`` for random ``u, w``.

    ``J`` is symmetric when ``g`` is the gradient of one scalar loss (then it is a Hessian);
    MAOAL's module-weighted direction is not, so its ``J`` is not. Keeps the graph.

    Args:
        inner_grads: ``g(θ, φ)`` built with ``create_graph=True``, aligned with ``params``.
        params: the tensors θ.
        probes: number of random pairs (2 VJPs each).
        rtol: tolerance relative to ``‖Jᵀu‖‖w‖ + ‖Jᵀw‖‖u‖``.
        generator: RNG for the probes; a fixed private one when ``None``.

    Returns:
        ``True`` when every probe agrees within ``rtol``.
    """
    inner_grads, params = _as_tuple(inner_grads, "inner_grads"), _as_tuple(params, "params")
    _validate(inner_grads, params)
    matvec = _transpose_matvec(inner_grads, params)
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(probes):
        u, w = _random_like(params, generator), _random_like(params, generator)
        jt_u, jt_w = matvec(u), matvec(w)
        u_j_w, w_j_u = float(_dot(jt_u, w)), float(_dot(jt_w, u))
        scale = float(_norm(jt_u) * _norm(w) + _norm(jt_w) * _norm(u))
        if abs(u_j_w - w_j_u) > rtol * scale:
            return False
    return True


def largest_eigenvalue(
    inner_grads: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
    tol: float = 1e-4,
    start: Sequence[Tensor] | None = None,
) -> float:
    """Dominant eigenvalue of ``J = ∂g/∂θ`` by power iteration with VJPs (``x <- Jᵀx/‖Jᵀx‖``).

    Returns the Rayleigh quotient ``xᵀJx`` of the last iterate: for a symmetric ``J`` (a
    Hessian) the eigenvalue of largest magnitude, with its sign (λ_max when ``J`` is positive
    semi-definite). For a non-symmetric ``J`` it converges to the dominant eigenvalue when that
    one is real and simple; with a complex dominant pair it does not converge and only gives a
    rough magnitude. Power iteration approaches from below: leave a margin. Keeps the graph.

    Args:
        inner_grads: ``g(θ, φ)`` built with ``create_graph=True``, aligned with ``params``.
        params: the tensors θ.
        iters: most iterations (one VJP each).
        generator: RNG for the start vector; a fixed private one when ``None``.
        tol: stop when the estimate changes by less than ``tol`` relative.
        start: the start vector, aligned with ``params`` (detached); ``None`` or an all-zero start:
            a random one from `generator`. A start close to the dominant eigenvector saves
            iterations: the bi-level methods' ``hyper_lr="auto"`` starts from the lower
            direction g itself, which a network's top curvature directions dominate.

    Returns:
        The estimate, as a float.

    Example (a start on the dominant eigenvector gives λ after one product; the second confirms it):
        >>> import torch
        >>> theta = torch.ones(2, dtype=torch.float64, requires_grad=True)
        >>> A = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> largest_eigenvalue((A @ theta,), (theta,), start=(torch.tensor([1.0, 0.0], dtype=torch.float64),))
        3.0
    """
    inner_grads, params = _as_tuple(inner_grads, "inner_grads"), _as_tuple(params, "params")
    _validate(inner_grads, params)
    if start is not None:
        start = _as_tuple(start, "start")
        if [tuple(t.shape) for t in start] != [tuple(p.shape) for p in params]:
            raise ValueError(
                f"start has shapes {[tuple(t.shape) for t in start]} but params has {[tuple(p.shape) for p in params]}; "
                "pass one tensor per parameter, shaped like it (e.g. the detached inner_grads)"
            )
        start = tuple(t.detach().to(dtype=p.dtype, device=p.device) for t, p in zip(start, params))
    return _power_iteration(_transpose_matvec(inner_grads, params), params, iters, generator, tol, start)


def _power_iteration(
    operator: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]],
    params: Sequence[Tensor],
    iters: int,
    generator: torch.Generator | None,
    tol: float,
    start: tuple[Tensor, ...] | None = None,
) -> float:
    """Rayleigh quotient ``xᵀAx`` of power iteration ``x <- Ax/‖Ax‖`` from `start` (or a random unit start).

    Stops after `iters` products, when the quotient changes by less than `tol` relative, or when
    ``Ax = 0`` (then the quotient is 0). An all-zero or non-finite `start` falls back to a random one.
    """
    norm = float(_norm(start)) if start is not None else 0.0
    if norm > 0.0 and math.isfinite(norm):
        x = start
    else:
        x = _random_like(params, generator)
        norm = float(_norm(x))
    x = tuple(torch._foreach_div(list(x), norm))
    estimate = 0.0
    for _ in range(iters):
        y = operator(x)
        previous, estimate = estimate, float(_dot(x, y))
        size = float(_norm(y))
        if size == 0.0:
            break
        x = tuple(torch._foreach_div(list(y), size))
        if abs(estimate - previous) <= tol * abs(estimate):
            break
    return estimate


def smallest_eigenvalue(
    inner_grads: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    shift: float | None = None,
    iters: int = 20,
    generator: torch.Generator | None = None,
    tol: float = 1e-4,
) -> float:
    """Estimate the smallest (most negative) eigenvalue of ``J = ∂g/∂θ`` by power iteration on ``c·I − J``.

    With ``c`` ≥ the spectral radius (`shift`; default ``|λ_dom|`` from :func:`largest_eigenvalue`
    times 1.01), the eigenvalues ``c − λ`` of ``c·I − J`` are ≥ 0 and the largest is ``c − λ_min``.
    For a symmetric ``J`` the Rayleigh quotient approaches it from below, so the estimate returned,
    ``c − quotient``, is never below the true λ_min: a negative estimate means that ``J`` has a
    negative eigenvalue (up to rounding). For a non-symmetric ``J`` it is the smallest real part
    only roughly. Keeps the graph.

    Example:
        >>> import torch
        >>> theta = torch.ones(3, dtype=torch.float64, requires_grad=True)
        >>> A = torch.diag(torch.tensor([5.0, 1.0, -0.5], dtype=torch.float64))
        >>> round(smallest_eigenvalue((A @ theta,), (theta,), iters=200, tol=1e-12), 3)
        -0.5
    """
    inner_grads, params = _as_tuple(inner_grads, "inner_grads"), _as_tuple(params, "params")
    _validate(inner_grads, params)
    if shift is None:
        shift = 1.01 * abs(largest_eigenvalue(inner_grads, params, iters=iters, generator=generator, tol=tol))
    if shift == 0.0:
        return 0.0
    matvec = _transpose_matvec(inner_grads, params)
    # (c·I − Jᵀ) x
    return shift - _power_iteration(lambda x: _axpy(-1.0, matvec(x), _scale(x, shift)), params, iters, generator, tol)


def check_step(
    inner_grads: Sequence[Tensor],
    params: Sequence[Tensor],
    lr: float,
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
    tol: float = 1e-4,
) -> float:
    """Estimate the spectrum of J and warn (:class:`HypergradWarning`) when the Neumann series with ``lr`` diverges.

    The exact condition: ``Σ_{i≥0} (I − lr·J)^i`` converges if and only if every eigenvalue of
    ``I − lr·J`` has modulus < 1, i.e. every eigenvalue λ of ``J`` (complex in general) has
    ``|1 − lr·λ| < 1``. For a real λ that is ``0 < lr·λ < 2``; for ``λ = a + ib`` it is
    ``lr < 2a/|λ|²`` (so ``a > 0`` is needed). Hence a **negative** eigenvalue anywhere in the
    spectrum, not only the dominant one, makes the truncated series grow like ``(1 + lr·|λ|)^K``
    for every ``lr > 0`` (and ``λ = 0`` makes it grow linearly in K); a too large step makes it
    alternate and grow along λ_max when ``lr·λ_max ≥ 2``.

    Checked here: the dominant eigenvalue λ_dom by power iteration on J, and the smallest one
    λ_min by power iteration on ``1.01·|λ_dom|·I − J`` (:func:`smallest_eigenvalue`). It warns when
    ``λ_min < 0`` (beyond ``1e-6·|λ_dom|``, rounding) — the series diverges along that direction for
    every lr — and when ``lr·λ_max ≥ 2``. For a symmetric J (a Hessian) both estimates err on the
    safe side of λ_min (never a false alarm, a slightly negative λ_min may be missed in few
    iterations). For a non-symmetric J (MAOAL) the estimates are of real parts and rough; complex
    eigenvalues are not checked. Costs ``2·iters`` VJPs at most. Keeps the graph.

    Args:
        inner_grads: ``g(θ, φ)`` built with ``create_graph=True``, aligned with ``params``.
        params: the tensors θ.
        lr: the Neumann step size ``η``.
        iters, generator, tol: passed to :func:`largest_eigenvalue` and :func:`smallest_eigenvalue`.

    Returns:
        The estimate of the dominant eigenvalue λ_dom (λ_max when J is positive semi-definite).

    Example:
        >>> import warnings, torch
        >>> theta = torch.ones(2, dtype=torch.float64, requires_grad=True)
        >>> g = (torch.diag(torch.tensor([4.0, -0.1], dtype=torch.float64)) @ theta,)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     lam = check_step(g, (theta,), lr=0.1, iters=100, tol=1e-10)
        >>> round(lam, 6), "negative eigenvalue" in str(caught[0].message)
        (4.0, True)
    """
    lam = largest_eigenvalue(inner_grads, params, iters=iters, generator=generator, tol=tol)
    lam_min = smallest_eigenvalue(inner_grads, params, shift=1.01 * abs(lam), iters=iters, generator=generator, tol=tol)
    if lam_min < -1e-6 * abs(lam):
        warnings.warn(
            f"J = ∂g/∂θ has a negative eigenvalue (smallest ≈ {lam_min:.4g}; dominant ≈ {lam:.4g}): J is not "
            f"positive definite here, |1 − lr·λ| = {1 - lr * lam_min:.6g} > 1 along it, and the Neumann series "
            "Σ(I − lr·J)^i diverges for every lr (the implicit gradient is not defined at a saddle); use fewer "
            "terms, hypergrad='exact' on a small model, or look at the lower problem (a larger L2 term convexifies it)",
            HypergradWarning,
            stacklevel=2,
        )
    if lr * lam >= 2:
        warnings.warn(
            f"lr·λ_max ≈ {lr:.4g}·{lam:.4g} = {lr * lam:.4g} >= 2: the Neumann series "
            f"Σ(I − lr·J)^i diverges; use lr < 2/λ_max ≈ {2 / lam:.4g} (e.g. 1/λ_max ≈ {1 / lam:.4g})",
            HypergradWarning,
            stacklevel=2,
        )
    return lam


# --------------------------------------------------------------------------- hypergradient


def implicit_grad(
    outer_loss: Tensor,
    inner_grads: Sequence[Tensor],
    params: Sequence[Tensor],
    hparams: Sequence[Tensor],
    *,
    method: str | Solver = "neumann",
    terms: int = 3,
    lr: float = 1.0,
    solver_kwargs: dict | None = None,
    retain_graph: bool = False,
    hparam_product: Callable[[Tensors], Tensors | None] | None = None,
) -> Tensors:
    """Total derivative ``d outer / d φ`` at the fixed point of ``θ <- θ − lr·g(θ, φ)``.

    By the implicit function theorem (JTDS App. A.1) ``dθ*/dφ = −J⁻¹ ∂g/∂φ`` with
    ``J = ∂g/∂θ``, so ``d outer/dφ = ∂outer/∂φ − uᵀ ∂g/∂φ`` where ``Jᵀ u = v = ∂outer/∂θ``.
    ``J`` need not be symmetric; only vector-Jacobian products ``uᵀJ`` are used.

    - ``"neumann"``: ``u = lr · Σ_{i=0..terms} (I − lr·Jᵀ)^i v``, i.e. the implicit term is
      ``−lr · vᵀ Σ_{i=0..terms} (I − lr·J)^i ∂g/∂φ`` (JTDS Eq. 9 with the step size explicit;
      ``lr = 1`` is the paper's). ``terms = K`` costs ``K`` VJPs. MAOAL's look-back
      ``Σ_{τ<M}`` (supplement Eq. A3) is ``terms = M − 1`` with ``lr = η₁``. Converges to the
      exact value when ``lr·λ_max(J) < 2`` (see :func:`check_step`); ``terms = 0`` is the
      first-order approximation and needs no Hessian-vector product.
    - ``"exact"``: dense ``J`` (``n × n``) and ``torch.linalg.solve``; for ``n ≤ max_params``.
    - ``"cg"``: conjugate gradients; only for symmetric positive definite ``J`` (checked).
    - a callable ``(matvec, b) -> x`` (see :func:`solve_cg`): solves ``Jᵀ u = v`` with it.

    ``lr`` only matters for ``"neumann"`` (at the exact fixed point it cancels).

    Args:
        outer_loss: scalar upper-level loss (e.g. the dev loss), a function of θ (and maybe φ).
        inner_grads: ``g(θ, φ)``, aligned with ``params``, built with ``create_graph=True``.
        params: the lower-level tensors θ (``requires_grad=True``).
        hparams: the hyper-parameters φ (``requires_grad=True``).
        method: ``"neumann"``, ``"exact"``, ``"cg"`` or a solver function.
        terms: Neumann terms ``K`` (``K + 1`` summands).
        lr: Neumann step size ``η``.
        solver_kwargs: per method. All: ``check_graph`` (default True: look for
            ``@once_differentiable`` backwards in g's graph). ``"exact"``: ``max_params``
            (5000), ``chunk_size`` (1024 Jacobian rows per batched VJP). ``"cg"``: ``maxiter``
            (100), ``tol`` (1e-6), ``check_symmetry`` (True), ``probes``, ``rtol``, ``generator``.
        retain_graph: keep the graphs of ``inner_grads`` and ``outer_loss``. By default the
            last VJP frees the graph of ``inner_grads`` (call again only after rebuilding it).
        hparam_product: ``u -> uᵀ ∂g/∂φ`` (one tensor per hparam) computed by the caller's own
            means, for the last product instead of a VJP through g's graph. Where φ only weighs
            per-sample losses (JTDS), ``uᵀ ∂g/∂φ = ∂/∂φ Σᵢ wᵢ(φ) (∇θ lᵢ · u)`` and the directional
            derivatives ``∇θ lᵢ · u`` come from one forward-mode pass (about half the double
            backward's time on Fashion-MNIST's ConvNet). Returning None falls back to the VJP.

    Returns:
        ``d outer / d φ``, one tensor per hparam, shaped like it (zeros where φ has no effect).

    Raises:
        ValueError: unknown method, misaligned inputs, ``"exact"`` on too many parameters,
            ``"cg"`` on a non-symmetric ``J``.
        DoubleBackwardError: an op in g's graph has no double backward.

    Example:
        Inner loss ``½(θ−1)² + ½φθ²`` so ``θ* = 1/(1+φ)``; outer ``½θ²`` gives
        ``d outer/dφ = −θ*³ = −8/27`` at ``φ = 0.5``:

        >>> import torch
        >>> phi = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
        >>> theta = torch.tensor([2 / 3], dtype=torch.float64, requires_grad=True)
        >>> inner = (0.5 * (theta - 1) ** 2 + 0.5 * phi * theta**2).sum()
        >>> g = torch.autograd.grad(inner, (theta,), create_graph=True)
        >>> outer = (0.5 * theta**2).sum()
        >>> (h,) = implicit_grad(outer, g, (theta,), (phi,), method="exact", retain_graph=True)
        >>> round(h.item(), 6)
        -0.296296
        >>> # J = 1.5, so with lr = 1/J the Neumann series is exact after one term:
        >>> (h,) = implicit_grad(outer, g, (theta,), (phi,), method="neumann", terms=1, lr=2 / 3)
        >>> round(h.item(), 6)
        -0.296296
    """
    inner_grads = _as_tuple(inner_grads, "inner_grads")
    params = _as_tuple(params, "params")
    hparams = _as_tuple(hparams, "hparams")
    solver_kwargs = dict(solver_kwargs or {})

    if callable(method):
        kind = "custom"
    elif isinstance(method, str) and method in METHODS:
        kind = method
    else:
        raise ValueError(
            f"unknown method {method!r}; valid: {', '.join(repr(m) for m in METHODS)} or a solver (matvec, b) -> x"
        )
    unknown = set(solver_kwargs) - _SOLVER_KEYS[kind]
    if unknown:
        raise ValueError(
            f"unknown solver_kwargs {sorted(unknown)} for method {kind!r}; accepted: {sorted(_SOLVER_KEYS[kind])}"
        )
    if not isinstance(outer_loss, Tensor) or outer_loss.numel() != 1:
        raise ValueError("outer_loss must be a scalar tensor")
    for i, h in enumerate(hparams):
        if not h.requires_grad:
            raise ValueError(f"hparams[{i}] does not require grad")
    _validate(inner_grads, params)
    if solver_kwargs.pop("check_graph", True):
        _check_graph(inner_grads, [outer_loss])

    solver: Solver | None = None
    if kind == "neumann":
        solver = solve_neumann(terms, lr)  # validates terms and lr
    elif kind == "custom":
        solver = method  # type: ignore[assignment]
    elif kind == "cg":
        probe = {key: solver_kwargs.pop(key) for key in ("probes", "rtol", "generator") if key in solver_kwargs}
        if solver_kwargs.pop("check_symmetry", True) and not is_symmetric(inner_grads, params, **probe):
            raise ValueError(
                "method='cg' needs a symmetric J = ∂g/∂θ, but J is not symmetric "
                "(uᵀJw ≠ wᵀJu for random u, w): inner_grads is not the gradient of one loss "
                "(e.g. MAOAL's module-weighted direction). Use method='neumann' or 'exact'."
            )
        solver = solve_cg(**solver_kwargs)
    else:
        n = sum(p.numel() for p in params)
        max_params = solver_kwargs.get("max_params", _DEFAULT_MAX_PARAMS)
        if n > max_params:
            raise ValueError(
                f"method='exact' builds a dense {n}×{n} Jacobian, but there are {n} parameters, "
                f"above the limit of {max_params} (raise it with solver_kwargs={{'max_params': ...}}); "
                "use method='neumann' or 'cg' for larger problems"
            )

    # v = ∂outer/∂θ and the direct term ∂outer/∂φ in one backward. The outer graph is kept:
    # it may share nodes with g's graph (e.g. an upper objective on the training batch).
    if outer_loss.requires_grad:
        first = _zeros_for(
            torch.autograd.grad(outer_loss, params + hparams, retain_graph=True, allow_unused=True), params + hparams
        )
    else:
        first = tuple(torch.zeros_like(t) for t in params + hparams)
    v, direct = first[: len(params)], first[len(params) :]

    if solver is not None:
        u = tuple(solver(_transpose_matvec(inner_grads, params), v))
    else:  # exact: solve Jᵀ u = v with the dense J
        jac = _dense_jacobian(inner_grads, params, int(solver_kwargs.get("chunk_size", 1024)))
        rhs = torch.cat([t.reshape(-1) for t in v])
        try:
            flat = torch.linalg.solve(jac.T, rhs)
        except torch.linalg.LinAlgError as err:
            raise ValueError(
                f"J = ∂g/∂θ is singular at this point; the implicit gradient does not exist ({err})"
            ) from err
        u = tuple(chunk.reshape(p.shape) for chunk, p in zip(flat.split([p.numel() for p in params]), params))

    unreached: list[int] = []
    implicit = None if hparam_product is None else hparam_product(u)
    if implicit is not None:
        implicit = tuple(implicit)
        if len(implicit) != len(hparams) or any(i.shape != h.shape for i, h in zip(implicit, hparams)):
            raise ValueError(
                "hparam_product must return one tensor per hparam, shaped like it: got shapes "
                f"{[tuple(i.shape) for i in implicit]} for hparams {[tuple(h.shape) for h in hparams]}"
            )
    else:
        implicit = _vjp(inner_grads, hparams, u, retain_graph=retain_graph, unused=unreached)
    if len(unreached) == len(hparams):
        # ∂g/∂φ is zero by structure: no path from φ to g(θ, φ) in the graph
        warnings.warn(
            "implicit_grad: g(θ, φ) does not depend on any of the hparams (no autograd path from φ to "
            "inner_grads), so the implicit term −uᵀ ∂g/∂φ is exactly zero and only the direct term ∂outer/∂φ "
            "is returned. Build inner_grads with create_graph=True from a loss in which φ enters without "
            "being detached (.detach(), torch.no_grad(), .item() cut the path).",
            HypergradWarning,
            stacklevel=2,
        )
    return tuple(d - i for d, i in zip(direct, implicit))


# --------------------------------------------------------------------------- utilities


def per_loss_grads(
    losses: Sequence[Tensor] | Tensor,
    params: Sequence[Tensor],
    *,
    batched: bool = True,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> list[Tensors]:
    """Gradients of each scalar loss with respect to ``params``, in one batched autograd call.

    The batched call (``is_grads_batched=True``, identity cotangents) vectorises the ``k``
    backward passes with vmap; when vmap cannot batch an op, or ``batched=False``, it falls
    back to one ``torch.autograd.grad`` per loss. Both give the same numbers up to floating-point
    rounding. The batched attempt retains the graph (so the fallback can still run); it is freed
    with the losses.

    Args:
        losses: ``k`` scalar losses, or a 1-D tensor of them.
        params: the tensors to differentiate with respect to.
        batched: try the batched call first.
        create_graph: build graphs of the gradients (for second-order use).
        retain_graph: keep the losses' graph; defaults to ``create_graph``.

    Returns:
        ``k`` tuples, one per loss, each aligned with ``params`` (zeros where unused).

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> grads = per_loss_grads([(w**2).sum(), (3 * w).sum()], (w,))
        >>> [g[0].tolist() for g in grads]
        [[2.0, 4.0], [3.0, 3.0]]
    """
    params = _as_tuple(params, "params")
    if isinstance(losses, Tensor):
        stacked = losses.reshape(-1)
        scalars = list(stacked.unbind())
    else:
        losses = list(losses)
        for i, loss in enumerate(losses):
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"losses[{i}] must be a scalar tensor")
        if not losses:
            return []
        scalars = [loss.reshape(()) for loss in losses]
        stacked = torch.stack(scalars)
    k = stacked.numel()
    if retain_graph is None:
        retain_graph = create_graph
    if not stacked.requires_grad:
        return [tuple(torch.zeros_like(p) for p in params) for _ in range(k)]

    if batched and k > 1:
        eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
        try:
            grads = torch.autograd.grad(
                stacked,
                params,
                grad_outputs=eye,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
                is_grads_batched=True,
            )
        except (RuntimeError, NotImplementedError):
            pass  # vmap could not batch an op: fall back to the loop
        else:
            full = [p.new_zeros((k, *p.shape)) if g is None else g for g, p in zip(grads, params)]
            return [tuple(g[i] for g in full) for i in range(k)]

    out: list[Tensors] = []
    # differentiate each loss itself, not stacked[i]: indexing the stack would push zero
    # cotangents through every other loss's graph
    for i in range(k):
        loss = scalars[i]
        if not loss.requires_grad:
            out.append(tuple(torch.zeros_like(p) for p in params))
            continue
        grads = torch.autograd.grad(
            loss, params, retain_graph=retain_graph or i < k - 1, create_graph=create_graph, allow_unused=True
        )
        out.append(_zeros_for(grads, params))
    return out


@contextlib.contextmanager
def frozen_buffers(*modules: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``modules`` on exit, exactly, even after an exception.

    BatchNorm running statistics, ``num_batches_tracked`` and any other registered buffer are
    snapshotted on entry and copied back in place on exit (so references stay valid; a buffer
    re-assigned inside the block is put back too). Forward passes for an upper step run inside
    it so they leave the model's state as it was.

    Args:
        modules: the modules whose buffers (recursively) to protect.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with frozen_buffers(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([0.0, 0.0], 0)
    """
    saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []
    for module in modules:
        for sub in module.modules():
            for name, buf in sub._buffers.items():
                if buf is not None:
                    saved.append((sub, name, buf, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for sub, name, buf, copy in saved:
                if sub._buffers.get(name) is not buf:
                    sub._buffers[name] = buf
                buf.copy_(copy)


def clip_grad_norm_(grads: Sequence[Tensor], max_norm: float, *, exact: bool = False) -> tuple[Tensors, Tensor]:
    """Scale ``grads`` so their joint 2-norm is at most ``max_norm`` (``exact=True``: exactly
    ``max_norm``, scaling up as well as down; a zero stays zero); returns new tensors.

    Unlike ``torch.nn.utils.clip_grad_norm_`` it is pure: it neither reads nor writes ``.grad``.
    A non-finite norm is returned as is (the caller decides: skip the step or raise).

    Args:
        grads: the tensors (e.g. a hypergradient from :func:`implicit_grad`).
        max_norm: the largest allowed joint norm (``> 0``).

    Returns:
        ``(clipped, total_norm)``: the scaled tensors and the norm before clipping.

    Example:
        >>> import torch
        >>> clipped, norm = clip_grad_norm_((torch.tensor([3.0, 4.0]),), 1.0)
        >>> round(norm.item(), 4), [round(x, 4) for x in clipped[0].tolist()]
        (5.0, [0.6, 0.8])
        >>> [round(x, 4) for x in clip_grad_norm_((torch.tensor([0.3, 0.4]),), 1.0, exact=True)[0][0].tolist()]
        [0.6, 0.8]
    """
    grads = _as_tuple(grads, "grads")
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    if not grads:
        return (), torch.zeros(())
    total = _norm(grads)
    scale = max_norm / (total + 1e-12)
    if exact:
        scale = torch.where(total > 0, scale, torch.zeros_like(scale))
    else:
        scale = torch.clamp(scale, max=1.0)
    return tuple(g * scale.to(g.dtype) for g in grads), total
