"""MAOAL (Chen et al., NeurIPS 2022): a learned importance of every auxiliary loss to every module.

The lower direction weights each auxiliary loss's gradient module by module (Eq. 4–5); the
importance α is learned from the dev loss by the shared bi-level upper step. It never weights
the primary loss, never lets α go negative, and never builds a second-order graph in a lower step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hypergrad import per_loss_grads
from ..partition import Partition, by_block, by_parameter, whole_model
from ..tasks import TaskSet
from .base import LossTerms, SetupInfo
from .bilevel import BilevelMethod
from .guard import NOT_GIVEN, legacy_fallback
from .presets import MAOAL_EXPERIMENTS
from .upper import UpperLevel

__all__ = ["MAOAL", "AuxLoss", "l2_penalty", "is_regulariser", "normalised_params", "PAPER_CONFIGS", "NONNEG", "PARTITIONS", "IMPORTANCE_PARAMS",
           "SCALE_INVARIANT"]

#: An auxiliary loss that is not a task of the TaskSet: ``fn(model, terms) -> scalar tensor``.
#: ``terms`` is the batch's `LossTerms` (inputs, features, outputs and per-task losses), so a
#: loss may be a regulariser of the parameters (`l2_penalty`) or any function of the batch.
AuxLoss = Callable[[nn.Module, LossTerms], Tensor]

#: How α is kept non-negative (SPEC-NOTES, MAOAL).
NONNEG = ("clamp", "softplus", "relu")
#: How α is parametrised (issue 13): ``"linear"`` (the paper: α itself is learned) or ``"log"``
#: (α = exp(β), β learned: an additive step on β is a multiplicative step on α, so α can fall
#: by orders of magnitude within a run and never goes negative).
IMPORTANCE_PARAMS = ("linear", "log")
#: Partition names accepted by `MAOAL(partition=...)` (paper §4.4, Table 4).
PARTITIONS: dict[str, Callable[[nn.Module], Partition]] = {
    "block": by_block,
    "parameter": by_parameter,
    "model": whole_model,
}

#: The paper's upper-level settings per experiment (supplement §2; look-back M = 3 throughout,
#: η = η₁ the lower learning rate as in Eq. 9, α initialised to 1.0, Block-L partition; the paper
#: states no clipping of the hypergradient). Lower optimisers are the settings' business.
PAPER_CONFIGS: dict[str, dict[str, Any]] = MAOAL_EXPERIMENTS


#: How MAOAL treats parameters whose scale the network's output ignores (issue 22): ``"tangent"``
#: removes the radial part of the lower direction on them, ``"none"`` leaves it (the paper).
SCALE_INVARIANT = ("tangent", "none")

#: autograd nodes of a layer whose output a normalisation layer may read directly
_LAYER_NODES = ("ConvolutionBackward", "AddmmBackward", "MmBackward")
#: nodes that pass a parameter to its layer unchanged in scale (a Linear's weight is transposed)
_PASS_NODES = ("TBackward", "ToCopyBackward")


def _node_kind(node: Any) -> str:
    return type(node).__name__.rstrip("0123456789")


def normalised_params(losses: Sequence[Tensor], params: Sequence[Tensor]) -> list[bool]:
    """Which of `params` every loss in `losses` reads only through a batch normalisation.

    Read off the losses' autograd graphs: a parameter qualifies when each of its uses is a
    convolution or linear layer (its weight or bias) whose output goes straight into a
    BatchNorm computed with the batch's statistics (training mode), and nothing else. Then the
    losses do not change when the parameter is multiplied by a positive constant (per output
    channel, BatchNorm divides the scale out; it subtracts the bias), so their gradient is
    orthogonal to it, and a shrinking regulariser on it only raises the effective step size.
    LayerNorm / GroupNorm, eval-mode BatchNorm and anything between the layer and the
    normalisation (an activation, a pooling) do not qualify.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
        >>> loss = net(torch.randn(8, 3)).pow(2).mean()
        >>> normalised_params([loss], list(net.parameters()))
        [True, True, False, False, False, False]
    """
    consumers: dict[Any, list[Any]] = {}
    leaves: dict[int, Any] = {}
    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _node_kind(node) == "AccumulateGrad":
            leaves[id(node.variable)] = node
        for child, _ in node.next_functions:
            if child is not None:
                consumers.setdefault(child, []).append(node)
                stack.append(child)

    def feeds_norm(layer: Any) -> bool:
        users = consumers.get(layer, [])
        return bool(users) and all(
            _node_kind(u) in ("NativeBatchNormBackward", "CudnnBatchNormBackward") and bool(getattr(u, "_saved_training", False))
            and u.next_functions[0][0] is layer
            for u in users
        )

    out = []
    for p in params:
        leaf = leaves.get(id(p))
        uses = list(consumers.get(leaf, [])) if leaf is not None else []
        ok = bool(uses)
        while ok and uses:
            use = uses.pop()
            kind = _node_kind(use)
            if kind in _PASS_NODES:
                more = consumers.get(use, [])
                ok = bool(more)
                uses += more
            elif kind in _LAYER_NODES:
                ok = feeds_norm(use)
            else:
                ok = False
        out.append(ok)
    return out


def _named_for_penalty(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``model.named_parameters()``, except that a `MultiHeadModel`'s banked heads (one
    `LinearBank` row per head) appear under their per-head names ``heads.<task>.weight`` /
    ``.bias`` as row views, so a name prefix such as ``"heads"`` or ``"heads.y"`` selects the same
    values whether the heads are stored one module each or as a bank."""
    banks = getattr(model, "_modules", {}).get("head_banks")
    if banks is None:
        return list(model.named_parameters())
    banked = {id(p) for p in banks.parameters()}
    out = [(n, p) for n, p in model.named_parameters() if id(p) not in banked]
    for bank in banks.values():
        for row, task in enumerate(bank.names):
            out += [(f"heads.{task}.weight", bank.weight[row]), (f"heads.{task}.bias", bank.bias[row])]
    return out


def l2_penalty(select: str | Sequence[str] | None = None, *, scale: float = 1.0, include_bias: bool = True) -> AuxLoss:
    """An L2 regulariser ``scale · Σ_p ‖p‖²`` as an auxiliary loss (MAOAL §4.1, recommendation).

    With MAOAL each module gets its own learned strength α_{l2, j} (paper Fig. 5: a larger
    regulariser for a larger head). Note the gradient is ``2·scale·p`` (no ½).

    Args:
        select: parameter-name prefixes to regularise (``"backbone"``, ``["heads.rating"]``);
            None: every trainable parameter of the model.
        scale: the coefficient.
        include_bias: also penalise parameters whose name ends in ``bias``.

    Returns:
        ``fn(model, terms) -> scalar``, usable in ``MAOAL(aux_losses={"l2": l2_penalty()})``.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 2.0]])), model.bias.fill_(3.0)
        >>> l2_penalty(scale=0.5)(model, None).item(), l2_penalty(include_bias=False)(model, None).item()
        (7.0, 5.0)
    """
    prefixes = None if select is None else ((select,) if isinstance(select, str) else tuple(select))
    scale = float(scale)

    def penalty(model: nn.Module, terms: LossTerms | None = None) -> Tensor:
        chosen = [
            p
            for name, p in _named_for_penalty(model)
            if p.requires_grad
            and (include_bias or not name.endswith("bias"))
            and (prefixes is None or any(name == s or name.startswith(s + ".") for s in prefixes))
        ]
        if not chosen:
            raise ValueError(
                f"l2_penalty(select={select!r}) matches no trainable parameter; "
                "pass name prefixes as in model.named_parameters()."
            )
        return scale * torch.stack([p.pow(2).sum() for p in chosen]).sum()

    penalty.__name__ = "l2_penalty"
    penalty.__qualname__ = f"l2_penalty(select={select!r}, scale={scale})"
    penalty.regulariser = True  # type: ignore[attr-defined]  (a pure regulariser: see `is_regulariser`)
    return penalty


def is_regulariser(tasks: TaskSet, name: str, aux_losses: Mapping[str, AuxLoss]) -> bool:
    """Whether auxiliary loss `name` is declared a pure regulariser (a function of θ, not of the data):
    an `aux_losses` callable with a true ``regulariser`` attribute (`l2_penalty`), or a task whose
    ``extra`` has a ``"regulariser"`` entry (the rating settings' L2 task)."""
    if name in aux_losses:
        return bool(getattr(aux_losses[name], "regulariser", False))
    return name in tasks and bool((tasks[name].extra or {}).get("regulariser"))


def resolve_aux(
    tasks: TaskSet, aux_tasks: Sequence[str] | None, aux_losses: Mapping[str, AuxLoss], method: str
) -> list[str]:
    """Auxiliary task names (validated), then the names of the extra losses: the α rows / net inputs."""
    names = [t.name for t in tasks.auxiliary] if aux_tasks is None else list(aux_tasks)
    for name in names:
        if name not in tasks:
            raise ValueError(f"{method}: auxiliary task {name!r} is not a task; tasks are {tasks.names}.")
        if tasks[name].primary:
            raise ValueError(f"{method}: {name!r} is the primary task; it is never weighted (MAOAL Eq. 5).")
    clash = sorted(set(names) & set(aux_losses)) + sorted(set(aux_losses) & {tasks.primary.name})
    if clash:
        raise ValueError(f"{method}: aux_losses names {clash} clash with task names; rename them.")
    for name, fn in aux_losses.items():
        if not callable(fn):
            raise TypeError(f"{method}: aux_losses[{name!r}] must be callable fn(model, terms) -> scalar.")
    out = names + list(aux_losses)
    if not out:
        raise ValueError(
            f"{method} needs at least one auxiliary loss, but the task set has no auxiliary task and "
            "aux_losses is empty; add an auxiliary task or pass aux_losses={'l2': l2_penalty()}."
        )
    return out


def extra_loss_values(model: nn.Module, terms: LossTerms, aux_losses: Mapping[str, AuxLoss], method: str) -> list[Tensor]:
    """The scalar values of the extra (non-task) auxiliary losses on this batch."""
    values = []
    for name, fn in aux_losses.items():
        value = fn(model, terms)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"{method}: aux_losses[{name!r}] must return a scalar tensor, got {value!r}.")
        values.append(value.reshape(()))
    return values


def _mark_reach(row: Tensor, grad: Tensor, group: int | Tensor) -> None:
    """Set ``row[j]`` where the gradient `grad` of one parameter is nonzero in module j: the whole
    parameter's module, or for a batched head parameter (`group` a tensor of each row's module) row by row."""
    if isinstance(group, Tensor):
        nonzero = grad.detach().reshape(grad.shape[0], -1).ne(0).any(1).cpu()
        row[group[nonzero]] = True
    elif bool(grad.ne(0).any()):
        row[group] = True


def _holds(group: int | Tensor, j: int) -> bool:
    """Whether a parameter (its module, or each of its rows' modules) has a part in module j."""
    return bool((group == j).any()) if isinstance(group, Tensor) else group == j


class MAOAL(BilevelMethod):
    """Module-Aware Optimization for Auxiliary Learning (Chen et al., NeurIPS 2022).

    α has shape ``(K_aux, m)``: one importance per (auxiliary loss i, module j) of a
    `Partition`. The lower direction (MAOAL Eq. 4–5) is

        g(θ, α) = ∇_θ L_goal + Σ_i Σ_j α_ij ∇_{θ^j} L_ai

    with the primary loss never weighted. The K_aux + 1 per-loss gradients are computed once
    each and combined module by module; with ``create_graph=True`` α stays in the graph for the
    upper step. Losses computed from different input streams (the primary images, rotated
    copies, another dataset, a regulariser of θ) have disjoint autograd graphs, so one backward
    pass each costs no more than one backward of their sum; losses that share a stream's forward
    pass are differentiated together by `auxnb.hypergrad.per_loss_grads` in one vmapped call
    (``batched``) or in a loop of backward passes.

    The upper step is the shared one (`BilevelMethod`): the primary dev loss, the implicit
    gradient with the best-response approximation (Eq. 9 / supplement A3)
    ``∇_α ≈ −η · vᵀ Σ_{τ=0..M−1} (I − η J)^τ ∂g/∂α`` with ``v = ∇_θ L_dev`` and ``J = ∂g/∂θ``
    (not symmetric), then one step of α's optimiser and the projection α ← max(α, 0).
    A3 sums M terms (τ = 0..M−1), so look-back ``M`` is ``implicit_grad(terms=M − 1)``.
    (Algorithm 1, lines 18–21, loops τ = 1..M and so adds one more summand, as the authors' code
    does: ``terms=3`` in `MAOAL.paper`.) ``η`` is η₁, the lower learning rate, in the paper (η = 1
    and no leading η in the authors' code); the series converges only when ``η·λ_max(J) < 2``
    (use ``check_every`` to estimate the spectrum and warn).

    Auxiliary losses are the TaskSet's auxiliary tasks (``aux_tasks``, default all) followed
    by any callables ``fn(model, terms) -> scalar`` in ``aux_losses`` (e.g. `l2_penalty`, the
    paper's recommendation setting). Extra losses are not multiplied by the Trainer's fp16 loss
    scale; use ``amp="bf16"`` (or none) with them.

    As published: `MAOAL.paper(experiment)`, the authors' code's configuration (supplement §2:
    T per experiment, upper Adam 1e-2 or SGD for recommendation; the code's series with η = 1,
    3 matvecs, no leading η, clipping at 10; α through a ReLU; α₀ = 1, Block-L, D_dev). The
    paper's text: `MAOAL.paper_text(experiment)` (M = 3 by Eq. A3, η = lower lr, no clipping).

    The constructor's defaults are auxnb's recommendation when labels are scarce (issue 8,
    measured by ``benchmarks/low_data.py`` and explained in the chapter
    ``notebooks/06_when_auxiliary_learning_helps.ipynb``): the paper's semi-supervised cadence
    (T = 3, M = 3, η = lower lr, Adam 1e-2 on α) with ``clip=10`` and ``upper_data="train"``:
    α is learned from the primary loss on fresh training batches instead of a D_dev carved out
    of the few labels, so θ keeps every label. On digits with 10 % of the labels this was the
    one switch that moved MAOAL from below STL and Equal to above both. Pass
    ``upper_data="dev"`` (optionally with ``refit``) to learn α on held-out data.

    Args:
        partition: ``"block"`` (Block-L, default), ``"parameter"`` (Parameter-L), ``"model"``
            (Model-L: one importance per loss, a learned loss weighting), a callable
            ``model -> Partition``, or a `Partition` of the trained model.
        lookback: M ≥ 1, look-back steps of Eq. 9 / A3 (M = 1: first-order, no Hessian
            product): sets ``terms = M − 1``.
        upper: the `UpperLevel` (default `default_upper`: T = 3, M = 3, η = lower lr, Adam 1e-2,
            clip 10, ``upper_data="train"``); its fields are also accepted as keywords
            (``lower_steps``, ``hyper_lr``, ``upper_lr``, ``clip``, ``upper_data``, ...), which
            override ``upper``'s (see `BilevelMethod`).
        nonneg: ``"clamp"`` (project after each upper step; default), ``"softplus"``
            (α = softplus(ρ)) or ``"relu"`` (α = relu(ρ); a pair below 0 stays off for good).
        init: initial α: a number (paper: 1.0), a ``(K_aux, m)`` array, or ``"grad-ratio"``:
            at the first lower step α_i = ‖∇_θ L_primary‖ / ‖∇_θ L_ai‖ for every module (each
            auxiliary loss starts with the primary gradient's norm, whatever its scale; issue 13).
        importance_param: one of `IMPORTANCE_PARAMS` (default ``"linear"``, the paper's); with
            ``"log"`` α = exp(β) and β is learned (``nonneg`` is then moot: α > 0 always).
        fallback, fallback_margin: deprecated (one FutureWarning): the do-no-harm guard is a run-level
            option now (`auxnb.selection`; ``Trainer(..., guard=...)``, ``run(..., guard=...)``); given
            here they still ask for it (``fallback=None``: this method alone).
        aux_tasks: auxiliary task names to use (default: every auxiliary task).
        aux_losses: name -> ``fn(model, terms)`` extra auxiliary losses.
        scale_invariant: ``"tangent"`` (default; issue 22, not in the paper): on the parameters the
            data losses read only through a training-mode BatchNorm (`normalised_params`, detected
            from the autograd graph on the first lower step: conv1–4 of ConvNet4, nothing in
            AutoInt) the direction's radial part is removed, so a regulariser cannot shrink
            weights whose scale the network ignores (the short-horizon hypergradient rewarded that
            as a larger effective step and drove α on conv1–3 to 1.6–2.5). ``"none"``: the paper's
            direction. ``trace()["scale_invariant_groups"]`` names the modules concerned.
        regulariser_init: the initial α of every pure regulariser (`is_regulariser`: `l2_penalty`,
            the rating settings' L2 task) on every module (issue 22, not in the paper): ``"auto"``
            (default) 0 where α can start at 0 and still grow (``nonneg="clamp"``, linear α), else
            0.01; a number; or None (start at `init`, the paper's 1.0). It applies when `init` is a
            number; an explicit ``(K_aux, m)`` array or ``"grad-ratio"`` wins. A regulariser then starts
            off and is switched on, module by module, only where the hypergradient asks for it:
            at α = 1 a strong L2 term crushed the rating model in the first steps, before the
            upper level could lower α (``benchmarks/results/methods_learn.md``).
        batched: for losses that share a stream: ``True`` one vmapped call, ``False`` a loop,
            ``"auto"`` (default) vmapped except on CPU, where the loop measured faster
            (``benchmarks/step_cost.py --per-loss-grads``).

    Example:
        >>> from auxnb.models import MLP, MultiHeadModel
        >>> from auxnb.tasks import Task, TaskSet
        >>> tasks = TaskSet([Task("y", "regression", primary=True), Task("a", "regression")])
        >>> model = MultiHeadModel.for_tasks(MLP(3, hidden=(4,)), tasks)
        >>> method = MAOAL(aux_losses={"l2": l2_penalty("backbone", scale=1e-3)})
        >>> method.setup(model, SetupInfo(tasks, torch.device("cpu"), num_train=10, seed=0))
        >>> method.loss_names, method.group_names, tuple(method.importance().shape)
        (['a', 'l2'], ('layer1', 'head:y', 'head:a'), (2, 3))
    """

    name = "maoal"
    #: auxnb's recommendation when labels are scarce (see the class docstring)
    default_upper = UpperLevel(lower_steps=3, terms=2, hyper_lr="lower", upper_optimizer="adam", upper_lr=1e-2,
                               clip=10.0, upper_data="train")

    def __init__(
        self,
        partition: str | Callable[[nn.Module], Partition] | Partition = "block",
        *,
        lookback: int | None = None,
        nonneg: str = "clamp",
        init: float | str | Sequence[Sequence[float]] | Tensor = 1.0,
        importance_param: str = "linear",
        aux_tasks: Sequence[str] | None = None,
        aux_losses: Mapping[str, AuxLoss] | None = None,
        batched: bool | str = "auto",
        scale_invariant: str = "tangent",
        regulariser_init: float | str | None = "auto",
        upper: UpperLevel | Mapping[str, Any] | None = None,
        fallback: Any = NOT_GIVEN,
        fallback_margin: Any = NOT_GIVEN,
        **upper_keywords: Any,
    ):
        if lookback is not None:
            if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 1:
                raise ValueError(f"lookback must be an integer M >= 1 (paper: 3), got {lookback!r}.")
            # A3 sums τ = 0..M-1: M summands = M-1 Hessian-vector products
            if "terms" in upper_keywords and upper_keywords["terms"] != lookback - 1:
                raise ValueError(
                    f"lookback={lookback} means terms={lookback - 1} (Eq. A3: M summands), but terms="
                    f"{upper_keywords['terms']!r} was given too; pass one of them."
                )
            upper_keywords["terms"] = lookback - 1
        super().__init__(upper=upper, **upper_keywords)
        legacy_fallback(self, fallback, fallback_margin)  # deprecated: the guard is run-level (auxnb.selection)
        if nonneg not in NONNEG:
            raise ValueError(f"nonneg must be one of {NONNEG}, got {nonneg!r}.")
        if isinstance(partition, str) and partition not in PARTITIONS:
            raise ValueError(f"Unknown partition {partition!r}; use {', '.join(PARTITIONS)}, a callable or a Partition.")
        if not (isinstance(partition, (str, Partition)) or callable(partition)):
            raise TypeError(f"partition must be a name, a callable model -> Partition or a Partition, got {partition!r}.")
        if importance_param not in IMPORTANCE_PARAMS:
            raise ValueError(f"importance_param must be one of {IMPORTANCE_PARAMS}, got {importance_param!r}.")
        if isinstance(init, str):
            if init != "grad-ratio":
                raise ValueError(f"init must be a number, a (K_aux, m) array or 'grad-ratio', got {init!r}.")
            init_t = torch.tensor(1.0, dtype=torch.float64)  # placeholder until the first lower step
        else:
            init_t = torch.as_tensor(init, dtype=torch.float64)
        positive = nonneg == "softplus" or importance_param == "log"
        if not torch.isfinite(init_t).all() or (init_t < 0).any() or (positive and (init_t <= 0).any()):
            bound = "> 0 (softplus or importance_param='log')" if positive else ">= 0"
            raise ValueError(f"init must be finite and {bound}, got {init!r}.")
        self.importance_param = importance_param
        self.partition = partition if isinstance(partition, str) else getattr(partition, "kind", getattr(partition, "__name__", "custom"))
        self.nonneg = nonneg
        self.init = init if isinstance(init, str) else (float(init_t) if init_t.dim() == 0 else init_t.tolist())
        self.aux_tasks = None if aux_tasks is None else list(aux_tasks)
        self.aux_losses = list(aux_losses or {})  # names only (config); the callables are private
        if batched not in (True, False, "auto"):
            raise ValueError(f"batched must be True, False or 'auto', got {batched!r}.")
        self.batched = batched
        if scale_invariant not in SCALE_INVARIANT:
            raise ValueError(f"scale_invariant must be one of {SCALE_INVARIANT}, got {scale_invariant!r}.")
        self.scale_invariant = scale_invariant
        if regulariser_init == "auto":
            # off, where α can start at 0 and still grow (clamp); else just above it
            regulariser_init = 0.0 if (nonneg == "clamp" and not positive) else 0.01
        if regulariser_init is not None:
            if isinstance(regulariser_init, bool) or not isinstance(regulariser_init, (int, float)) or not regulariser_init >= 0 \
                    or regulariser_init == float("inf"):
                raise ValueError(f"regulariser_init must be a finite number >= 0 or None (use init), got {regulariser_init!r}.")
            if regulariser_init == 0 and (positive or nonneg == "relu"):
                raise ValueError("regulariser_init=0 needs α that can start at 0 and still grow: use nonneg='clamp' with "
                                 "importance_param='linear', or pass regulariser_init > 0 (or None: the regulariser starts at init).")
            regulariser_init = float(regulariser_init)
        self.regulariser_init = regulariser_init
        self._partition_spec = partition
        self._aux_fns: dict[str, AuxLoss] = dict(aux_losses or {})

    @classmethod
    def paper(cls, experiment: str = "cifar", **overrides: Any) -> "MAOAL":
        """MAOAL as the authors ran it for `experiment` (a key of `PAPER_CONFIGS`); overrides win.

        The configuration behind the published tables: ``UpperLevel.authors("maoal", experiment)``
        (the supplement's T and α optimiser; the authors' code's series Σ_{i=0..3} (I − J)^i with
        η = 1, 3 matvecs, no leading η, clipping at 10), α through a ReLU as in the code, α₀ = 1,
        Block-L, α learned on D_dev. `paper_text` is the paper's text instead; the book page
        "The papers and the authors' code" lists every difference.

        Example:
            >>> m = MAOAL.paper("cub-semi")
            >>> m.lower_steps, m.terms, m.hyper_lr, m.leading_eta, m.clip, m.nonneg
            (3, 3, 1.0, False, 10.0, 'relu')
        """
        return cls._preset("authors", experiment, {"nonneg": "relu"}, overrides)

    @classmethod
    def paper_text(cls, experiment: str = "cifar", **overrides: Any) -> "MAOAL":
        """MAOAL as the paper's text states it: ``UpperLevel.paper_text("maoal", experiment)``
        (Eq. 9 / A3 with M = 3: 2 matvecs, η = η₁ the lower learning rate leading the sum, no
        clipping), α ≥ 0 by clamping (the paper does not say how), α₀ = 1, Block-L.

        Example:
            >>> m = MAOAL.paper_text("cub-semi")
            >>> m.lower_steps, m.lookback, m.terms, m.hyper_lr, m.leading_eta, m.clip
            (3, 3, 2, 'lower', True, None)
        """
        return cls._preset("paper_text", experiment, {"nonneg": "clamp"}, overrides)

    @classmethod
    def _preset(cls, kind: str, experiment: str, own: Mapping[str, Any], overrides: Mapping[str, Any]) -> "MAOAL":
        if experiment not in PAPER_CONFIGS:
            raise ValueError(f"Unknown experiment {experiment!r}; the paper's are {', '.join(PAPER_CONFIGS)}.")
        upper = getattr(UpperLevel, kind)("maoal", experiment)
        kwargs = {"partition": "block", "init": 1.0, "importance_param": "linear", "scale_invariant": "none",
                  "regulariser_init": None,
                  **own, "upper": upper, **overrides}
        partition = kwargs.pop("partition")
        return cls(partition, **kwargs)

    @property
    def lookback(self) -> int:
        """M of Eq. A3 (``terms + 1`` summands). The authors' code runs 3 matvecs (``terms = 3``),
        which reads as M = 4 here (Algorithm 1 with M = 3 adds one summand to A3)."""
        return self.terms + 1

    def config(self) -> dict[str, Any]:
        return {**super().config(), "lookback": self.lookback}

    # -- set-up -------------------------------------------------------------------
    def _make_partition(self, model: nn.Module) -> Partition:
        spec = self._partition_spec
        if isinstance(spec, str):
            return PARTITIONS[spec](model)
        if isinstance(spec, Partition):
            part = spec
        else:
            part = spec(model)
            if not isinstance(part, Partition):
                raise TypeError(f"partition callable returned {type(part).__name__}, expected an auxnb Partition.")
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        if {id(p) for p in part.params} != trainable:
            raise ValueError(
                "The partition does not cover exactly the trainable parameters of the model being "
                "trained; build it from this model (pass a callable model -> Partition to be safe)."
            )
        return part

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        self._upper_opt = None  # α is re-created below: a cached optimiser would hold the old one
        self.partition_ = self._make_partition(model)
        self.loss_names = resolve_aux(info.tasks, self.aux_tasks, self._aux_fns, "MAOAL")
        self._task_aux = [n for n in self.loss_names if n not in self._aux_fns]
        k, m = len(self.loss_names), len(self.partition_)
        ref = next(p for p in model.parameters() if p.requires_grad)
        self._pending_init = self.init == "grad-ratio"
        init = torch.as_tensor(1.0 if self._pending_init else self.init, dtype=torch.float64)
        if init.dim() == 0:
            init = init.expand(k, m)
        elif tuple(init.shape) != (k, m):
            raise ValueError(
                f"init has shape {tuple(init.shape)} but α is (K_aux, m) = ({k}, {m}): losses "
                f"{self.loss_names} × modules {list(self.partition_.names)}."
            )
        self.regulariser_rows = [i for i, n in enumerate(self.loss_names) if is_regulariser(info.tasks, n, self._aux_fns)]
        if self.regulariser_init is not None and self.regulariser_rows and not self._pending_init \
                and torch.as_tensor(self.init).dim() == 0:  # an explicit (K_aux, m) init or "grad-ratio" wins
            init = init.clone()
            init[self.regulariser_rows] = self.regulariser_init
        raw = self._raw(init)
        self.alpha = nn.Parameter(raw.to(device=ref.device, dtype=ref.dtype).clone())
        # a parameter's module, or for a batched head parameter (`LinearBank`) each row's module
        self._group = {id(p): self.partition_.groups_of(p) for p in self.partition_.params}
        self._reach: Tensor | None = None
        self._invariant: dict[int, bool] | None = None  # param id -> scale-invariant (first lower step)

    def _raw(self, alpha: Tensor) -> Tensor:
        """The learned parameter that gives importance `alpha` (inverse of `importance`)."""
        if self.importance_param == "log":
            return torch.log(alpha)
        return torch.log(torch.expm1(alpha)) if self.nonneg == "softplus" else alpha

    @torch.no_grad()
    def _init_from_grads(self, grads: list[tuple[Tensor, ...]]) -> None:
        """``init="grad-ratio"``: α_i = ‖∇L_primary‖ / ‖∇L_ai‖ (every module), from this first batch."""
        def norm(g: tuple[Tensor, ...]) -> Tensor:
            return torch.sqrt(sum((t.detach().double() ** 2).sum() for t in g))

        primary = norm(grads[0])
        ratio = torch.stack([primary / norm(g).clamp_min(1e-12) for g in grads[1:]])
        ratio = ratio.clamp(1e-6, 1e6).to(self.alpha.dtype)  # a zero gradient leaves α finite
        self.alpha.copy_(self._raw(ratio[:, None].expand_as(self.alpha)))
        self._pending_init = False

    @property
    def group_names(self) -> tuple[str, ...]:
        """Module names (the columns of α), from the partition."""
        return self.partition_.names

    def hparams(self) -> list[nn.Parameter]:
        return [self.alpha]

    def importance(self) -> Tensor:
        """α ≥ 0, shape ``(K_aux, m)``, graph attached (rows `loss_names`, columns `group_names`)."""
        if self.importance_param == "log":
            return torch.exp(self.alpha)
        if self.nonneg == "softplus":
            return F.softplus(self.alpha)
        if self.nonneg == "relu":
            return F.relu(self.alpha)
        return self.alpha

    def project(self) -> None:
        if self.nonneg == "clamp" and self.importance_param == "linear":
            self.alpha.clamp_(min=0.0)

    def task_names(self, tasks: TaskSet) -> list[str]:
        return [tasks.primary.name, *self._task_aux]

    # -- the lower direction (MAOAL Eq. 4–5) ---------------------------------------
    def aux_values(self, terms: LossTerms) -> list[Tensor]:
        """The K_aux auxiliary losses on this batch, in the order of `loss_names`."""
        missing = [n for n in self._task_aux if n not in terms.losses]
        if missing:
            raise KeyError(f"MAOAL: the batch has no losses for auxiliary tasks {missing}; it has {sorted(terms.losses)}.")
        return [terms.mean(n) for n in self._task_aux] + extra_loss_values(self._model, terms, self._aux_fns, "MAOAL")

    #: With more auxiliary losses than this (CUB's 312 attributes), the direction is computed module
    #: by module as ∇_θj (L_0 + Σ_i α_ij L_i) (`_chunked_direction`): one gradient-sized buffer per
    #: module pass and m passes, lower and upper steps alike, instead of K_aux + 1 per-loss gradients
    #: (and, in the upper step, their K_aux + 1 double-backward graphs). The per-loss gradients are
    #: computed once, on the first lower step, for the reach table and ``init="grad-ratio"``: this
    #: many at a time, so that step's peak is about ``(grad_chunk + 1) × 4 × n_params`` bytes
    #: (ConvNet4 + 313 heads, 0.15 M parameters: ~20 MB at 32; ResNet18, 11 M: ~1.5 GB) on a GPU
    #: (``batched``), one gradient at a time on a CPU. With ``K_aux ≤ grad_chunk`` (every MAOAL
    #: paper setting) nothing changes, bit for bit; above it the numbers agree to float rounding.
    grad_chunk: int = 32

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        """MAOAL Eq. 4–5; with ``scale_invariant="tangent"`` the direction on each parameter the data
        losses read only through a BatchNorm (`normalised_params`, found on the first lower step)
        loses its radial part: d ← d − (⟨d, p⟩/‖p‖²)·p. The data losses' gradients there are
        orthogonal to p already, so only a regulariser's pull on p's norm (which the network's
        output ignores, and which only changes the effective step size) is removed."""
        params = list(params)
        losses = [self.scaled(v) for v in (terms.mean(terms.primary), *self.aux_values(terms))]
        if self.scale_invariant == "tangent" and self._invariant is None and not create_graph:
            flags = normalised_params(losses[: 1 + len(self._task_aux)], params)
            self._invariant = {id(p): f for p, f in zip(params, flags)}
        out = self._direction(losses, terms, params, create_graph)
        if self.scale_invariant != "tangent" or not self._invariant:
            return out
        projected = []
        for p, d in zip(params, out):
            if self._invariant.get(id(p), False):
                norm2 = (p * p).sum()
                if bool(norm2 > 0):
                    d = d - ((d * p).sum() / norm2) * p
            projected.append(d)
        return tuple(projected)

    def _direction(self, losses: list[Tensor], terms: LossTerms, params: list[Tensor], create_graph: bool) -> tuple[Tensor, ...]:
        try:
            groups = [self._group[id(p)] for p in params]
        except KeyError:
            raise ValueError(
                "MAOAL got a parameter that is not in its partition; the partition must cover every "
                "parameter the lower optimiser trains."
            ) from None
        if len(losses) - 1 > self.grad_chunk:
            return self._chunked_direction(losses, params, terms.tasks, groups, create_graph)
        grads = self._per_loss_grads(losses, params, terms.tasks, create_graph)
        if self._pending_init and not create_graph:
            self._init_from_grads(grads)
        alpha = self.importance()
        if not create_graph:
            alpha = alpha.detach()  # lower steps are first-order
        if self._reach is None and not create_graph:
            self._record_reach(grads, groups)
        out = []
        for idx, j in enumerate(groups):
            stacked = torch.stack([g[idx] for g in grads[1:]])  # [K_aux, *shape]
            if isinstance(j, Tensor):  # a batched head parameter: row r is weighted by its module j[r]'s α
                weights = alpha[:, j.to(alpha.device)].to(stacked.dtype).reshape(*stacked.shape[:2], *([1] * (stacked.dim() - 2)))
            else:
                weights = alpha[:, j].to(stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
            out.append(grads[0][idx] + (weights * stacked).sum(0))  # MAOAL Eq. 5
        return tuple(out)

    def _chunked_direction(self, losses, params, tasks, groups, create_graph) -> tuple[Tensor, ...]:
        """MAOAL Eq. 5 for many auxiliary losses, without holding one gradient per loss.

        By linearity, for a parameter p of module j: ∇_p L_0 + Σ_i α_ij ∇_p L_i = ∇_p (L_0 + Σ_i α_ij L_i),
        so one backward pass per module, of its α-weighted loss, gives the direction (with a graph to α
        when `create_graph`): memory of one gradient, cost of m passes instead of K_aux + 1 (a head's
        pass only reaches its own loss). The per-loss gradients are needed once, for the reach table
        and ``init="grad-ratio"``: computed on the first lower step, `grad_chunk` at a time, each
        chunk freed before the next.
        """
        first = not create_graph and (self._pending_init or self._reach is None)
        if first:
            norms: list = [None] * len(losses)
            reach = torch.zeros(len(self.loss_names), len(self.partition_), dtype=torch.bool)
            for members, grads in self._grad_calls(losses, params, tasks, False, self.grad_chunk, retain_all=True):
                with torch.no_grad():
                    for i, g in zip(members, grads):
                        norms[i] = torch.sqrt(sum((t.detach().double() ** 2).sum() for t in g))
                        if i > 0:
                            for idx, j in enumerate(groups):
                                _mark_reach(reach[i - 1], g[idx], j)
                del grads
            if self._reach is None:
                self._reach = reach
            if self._pending_init:
                with torch.no_grad():
                    ratio = torch.stack([norms[0] / n.clamp_min(1e-12) for n in norms[1:]])
                    ratio = ratio.clamp(1e-6, 1e6).to(self.alpha.dtype)
                    self.alpha.copy_(self._raw(ratio[:, None].expand_as(self.alpha)))
                self._pending_init = False
        alpha = self.importance()
        if not create_graph:
            alpha = alpha.detach()  # lower steps are first-order
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        members: dict[int, list[int]] = {}
        for idx, j in enumerate(groups):
            for module in (j.unique().tolist() if isinstance(j, Tensor) else [j]):
                members.setdefault(module, []).append(idx)
        out: list = [None] * len(params)
        rows: dict[int, list[tuple[Tensor, Tensor]]] = {}  # batched head parameter -> (rows, their direction)
        order = list(members.items())
        for n, (j, idxs) in enumerate(order):
            w = torch.cat([torch.ones(1, dtype=stacked.dtype, device=stacked.device), alpha[:, j].to(stacked.dtype)])
            grads = torch.autograd.grad((w * stacked).sum(), [params[i] for i in idxs], allow_unused=True,
                                        retain_graph=create_graph or n < len(order) - 1, create_graph=create_graph)
            for i, g in zip(idxs, grads):
                g = torch.zeros_like(params[i]) if g is None else g
                if isinstance(groups[i], Tensor):  # only module j's rows of this pass are module j's direction
                    mine = (groups[i] == j).nonzero().flatten().to(g.device)
                    rows.setdefault(i, []).append((mine, g.index_select(0, mine)))
                else:
                    out[i] = g
        for i, pieces in rows.items():
            index = torch.cat([r for r, _ in pieces])
            out[i] = torch.zeros_like(params[i]).index_copy(0, index, torch.cat([v for _, v in pieces]))
        return tuple(out)

    def _per_loss_grads(
        self, losses: list[Tensor], params: list[Tensor], tasks: TaskSet, create_graph: bool
    ) -> list[tuple[Tensor, ...]]:
        """∇_θ of each loss (primary first), one backward pass per loss; losses of one stream together."""
        grads: list = [None] * len(losses)
        for members, out in self._grad_calls(losses, params, tasks, create_graph, None):
            for i, g in zip(members, out):
                grads[i] = g
        return grads

    def _grad_calls(self, losses, params, tasks, create_graph: bool, chunk: int | None, retain_all: bool = False):
        """Yield ``(members, their gradients)`` per autograd call, at most `chunk` losses a call."""
        streams = [tasks.primary.stream] + [tasks[n].stream for n in self._task_aux]
        keys: list[object] = [*streams, *[("extra", n) for n in self._aux_fns]]
        groups: dict[object, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        batched = self.batched if self.batched != "auto" else params[0].device.type != "cpu"
        calls = [members for members in groups.values() if len(members) > 1 and batched]
        calls += [[i] for members in groups.values() if not (len(members) > 1 and batched) for i in members]
        if chunk is not None:
            calls = [members[k:k + chunk] for members in calls for k in range(0, len(members), chunk)]
        for n, members in enumerate(calls):
            # keep the graphs until the last call: an extra loss may reuse a stream's forward pass
            retain = retain_all or create_graph or n < len(calls) - 1
            yield members, per_loss_grads([losses[i] for i in members], params, batched=True,
                                          create_graph=create_graph, retain_graph=retain)

    @torch.no_grad()
    def _record_reach(self, grads: list[tuple[Tensor, ...]], groups: list[int]) -> None:
        """Which (loss, module) pairs get a gradient at all (e.g. an aux loss never reaches
        another task's head): α there has no effect, and plots can grey it out."""
        reach = torch.zeros(len(self.loss_names), len(self.partition_), dtype=torch.bool)
        for i, g in enumerate(grads[1:]):
            for idx, j in enumerate(groups):
                _mark_reach(reach[i], g[idx], j)
        self._reach = reach

    # -- record ------------------------------------------------------------------
    def trace(self) -> dict[str, Any]:
        alpha = self.importance().detach().double().cpu()
        out: dict[str, Any] = {
            "importance": alpha.tolist(),
            "importance_losses": list(self.loss_names),
            "importance_groups": list(self.group_names),
        }
        if self._reach is not None:
            out["importance_reach"] = self._reach.tolist()
        if self._invariant is not None:
            # modules with at least one parameter treated as scale-invariant (scale_invariant="tangent")
            ids = {i for i, f in self._invariant.items() if f}
            out["scale_invariant_groups"] = [g for j, g in enumerate(self.group_names)
                                             if any(id(p) in ids for p in self.partition_.params if _holds(self._group[id(p)], j))]
        for i, loss in enumerate(self.loss_names):
            for j, group in enumerate(self.group_names):
                out[f"importance/{loss}/{group}"] = float(alpha[i, j])
        out.update(super().trace())  # the last upper step's diagnostics, as upper/<name>
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["reach"] = None if self._reach is None else self._reach.clone()
        state["pending_init"] = self._pending_init
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._reach = state.get("reach")
        self._pending_init = bool(state.get("pending_init", False))
