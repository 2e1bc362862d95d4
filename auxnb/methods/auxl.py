"""AuxL (Navon et al., ICLR 2021, "Auxiliary Learning by Implicit Differentiation"): a learned,
monotone combination of the per-sample losses, trained with the implicit gradient on D_dev.

The combination network's weights are clamped non-negative after every upper step, so the
combined loss never decreases when a task's loss grows; the method never touches θ in an upper step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import PRIMARY_STREAM, TaskSet
from .base import LossTerms, SetupInfo
from .upper import UpperLevel
from .bilevel import BilevelMethod
from .maoal import AuxLoss, extra_loss_values, resolve_aux

__all__ = ["AuxL", "MonotoneCombiner", "loss_matrix", "KINDS"]

KINDS = ("linear", "nonlinear")


class MonotoneCombiner(nn.Module):
    """``h(ℓ) : R^n → R``, non-decreasing in every input (Navon et al. 2021, §3.1).

    ``linear``: ``h(ℓ) = w·ℓ`` (w ≥ 0). ``nonlinear``: an MLP whose weights are ≥ 0 and whose
    activations (softplus) are increasing, so every path from an input to the output has a
    non-negative slope; biases are free (they do not affect monotonicity). Non-negativity is
    kept by `clamp_` (a projection), as in Navon's ``MonoHyperNet.clamp``.

    Args:
        in_features: n, the number of losses.
        kind: ``"linear"`` or ``"nonlinear"``.
        hidden: hidden widths of the nonlinear net (Navon's Pet/CUB: (10, 10)).
        init: initial weight of the linear net (Navon: 1.0).
        init_upper: nonlinear weights start uniform in [0, init_upper] (Navon: 0.2).
        generator: for the nonlinear initialisation (never the global RNG).

    Example:
        >>> h = MonotoneCombiner(2, "linear", init=0.5)
        >>> h(torch.tensor([[2.0, 4.0]])).tolist()
        [3.0]
    """

    def __init__(
        self,
        in_features: int,
        kind: str = "nonlinear",
        hidden: Sequence[int] = (10, 10),
        init: float = 1.0,
        init_upper: float = 0.2,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        self.kind = kind
        if kind == "linear":
            self.layers = nn.ModuleList([nn.Linear(in_features, 1, bias=False)])
            nn.init.constant_(self.layers[0].weight, float(init))
        else:
            widths = [in_features, *[int(h) for h in hidden], 1]
            if min(widths) < 1:
                raise ValueError(f"hidden widths must be positive, got {tuple(hidden)}.")
            self.layers = nn.ModuleList(
                nn.Linear(a, b, bias=i < len(widths) - 2) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
            )
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            with torch.no_grad():
                for layer in self.layers:
                    layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * float(init_upper))
                    if layer.bias is not None:
                        layer.bias.zero_()

    def forward(self, losses: Tensor) -> Tensor:
        """``losses [B, n] -> [B]``."""
        x = losses
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.softplus(x)
        return x[:, 0]

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project every weight to ≥ 0 (biases stay free)."""
        for layer in self.layers:
            layer.weight.clamp_(min=0.0)


def loss_matrix(terms: LossTerms, names: Sequence[str], extra: Mapping[str, Tensor] | None = None) -> Tensor:
    """Per-sample losses as a ``[B, n]`` matrix over the primary batch's B samples.

    Column k holds task k's loss per primary sample, rescaled so that its batch mean is the
    task's mean loss over labelled samples (`LossTerms.mean`): a sample without a label
    contributes 0. A task on a view of the same images (its stream carries the primary label
    and the primary batch's sample ids, e.g. rotations) is aligned by sample id, its rows for
    one image summed; a task on an independent stream (a different input, e.g. MNIST) and an
    extra scalar loss (`extra`) enter as their batch mean on every row. So for a linear h the
    combined loss is exactly ``Σ_k w_k · mean_k``.
    """
    primary = terms.primary
    ref = terms.losses[primary]
    b = ref.shape[0]
    primary_index = terms.index.get(PRIMARY_STREAM)
    columns = []
    for name in names:
        if extra is not None and name in extra:
            columns.append(extra[name].reshape(()).expand(b))
            continue
        loss = terms.losses[name]
        count = terms.masks[name].sum().clamp_min(1).to(loss.dtype)
        stream = terms.tasks[name].stream
        if stream == PRIMARY_STREAM:
            columns.append(loss * (b / count))
            continue
        index = terms.index.get(stream)
        aligned = (
            primary_index is not None
            and index is not None
            and primary in terms.targets.get(stream, {})
            and bool(torch.isin(index, primary_index).all())
        )
        if aligned:
            match = (index[:, None] == primary_index[None, :]).to(loss.dtype)  # [B_s, B]
            columns.append((loss @ match) * (b / count))
        else:
            columns.append(terms.mean(name).expand(b))
    return torch.stack(columns, dim=1)


class AuxL(BilevelMethod):
    """AuxiLearn's learned loss combination (Navon et al., ICLR 2021, §3.1–3.2), a MAOAL baseline.

    The lower objective is ``skip · L_goal + mean_b h(ℓ_b; φ)`` where ``ℓ_b`` is sample b's
    vector of losses (see `loss_matrix`) and h a `MonotoneCombiner` with φ ≥ 0. φ is trained by
    the shared implicit-gradient upper step (Navon: Neumann series with 3 terms and the lower
    learning rate as step, `terms=3, hyper_lr="lower"`) and clamped ≥ 0 after it.

    Choices (Navon's code, ``auxilearn/hypernet.py``): the primary loss is an input of h too
    (``primary_in_net=True``) and is also added once outside it (the skip connection; Navon's
    nonlinear net always has it, the linear one by default in their experiments), so at the
    start the linear net weighs the primary loss 2 and each auxiliary loss 1. Navon's hypergradient
    omits the leading η of the Neumann series (auxnb's has it by default, as MAOAL Eq. 9;
    ``leading_eta=False`` drops it, as in ``UpperLevel.authors("auxl")`` and the `paper` scale). The upper
    optimiser defaults to Adam 1e-2 (as MAOAL's), the MAOAL paper's fair-comparison setting;
    Navon's Pet setting was SGD 1e-3, momentum 0.9, weight decay 5e-3, an upper step every 30
    lower steps and clipping at 50. Auxiliary losses that are not tasks (``aux_losses``, e.g.
    an L2 regulariser) enter as a column equal to their value.

    Under ``amp="fp16"`` the Trainer scales the task losses before they reach the net, which a
    nonlinear h does not commute with: use ``amp="bf16"`` (or none) with the nonlinear net.

    With ``kind="linear", primary_in_net=False`` AuxL is a learned per-loss weighting
    ``L_goal + Σ_i w_i L_ai``, i.e. MAOAL with the Model-L partition.

    Args:
        kind: ``"linear"`` or ``"nonlinear"`` (default; the MAOAL paper's "non-linear combination").
        hidden: hidden widths of the nonlinear net.
        skip: add ``L_goal`` outside the net.
        primary_in_net: feed the primary loss to the net as well.
        init, init_upper: initial weights (linear: all `init`; nonlinear: uniform [0, init_upper]).
        upper, upper_keywords: the `UpperLevel` (default `default_upper`) and its fields as keywords,
            which override ``upper``'s (see `BilevelMethod`).
        aux_tasks: auxiliary task names to use (default: all); aux_losses: extra named losses.

    Example:
        >>> AuxL(kind="linear").kind
        'linear'
    """

    name = "auxl"
    #: the constructor's upper level (see `BilevelMethod`; each field is also a keyword)
    default_upper = UpperLevel(lower_steps=20, terms=3, hyper_lr="lower", upper_data="dev",
                               upper_optimizer="adam", upper_lr=1e-2, upper_momentum=0.9, clip=10.0)

    def __init__(
        self,
        kind: str = "nonlinear",
        *,
        hidden: Sequence[int] = (10, 10),
        skip: bool = True,
        primary_in_net: bool = True,
        init: float = 1.0,
        init_upper: float = 0.2,
        aux_tasks: Sequence[str] | None = None,
        aux_losses: Mapping[str, AuxLoss] | None = None,

        upper: UpperLevel | Mapping[str, Any] | None = None,
        **upper_keywords: Any,
    ):
        super().__init__(upper=upper, **upper_keywords)
        if kind not in KINDS:
            raise ValueError(f"AuxL kind must be one of {KINDS}, got {kind!r}.")
        if init < 0 or init_upper < 0:
            raise ValueError(f"init and init_upper must be >= 0 (the net's weights are non-negative), got {init}, {init_upper}.")
        if not skip and not primary_in_net:
            raise ValueError("With skip=False and primary_in_net=False the primary loss would not be trained; set one.")
        self.kind = kind
        self.hidden = [int(h) for h in hidden]
        self.skip = bool(skip)
        self.primary_in_net = bool(primary_in_net)
        self.init = float(init)
        self.init_upper = float(init_upper)
        self.aux_tasks = None if aux_tasks is None else list(aux_tasks)
        self.aux_losses = list(aux_losses or {})
        self._aux_fns: dict[str, AuxLoss] = dict(aux_losses or {})

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        self._upper_opt = None  # the net is re-created below
        aux = resolve_aux(info.tasks, self.aux_tasks, self._aux_fns, "AuxL")
        self._task_aux = [n for n in aux if n not in self._aux_fns]
        self.loss_names = ([info.tasks.primary.name] if self.primary_in_net else []) + aux
        ref = next(p for p in model.parameters() if p.requires_grad)
        generator = torch.Generator().manual_seed(int(info.seed) + 4093)
        self.combiner = MonotoneCombiner(
            len(self.loss_names), self.kind, self.hidden, self.init, self.init_upper, generator
        ).to(device=ref.device, dtype=ref.dtype)
        self._last_mean: Tensor | None = None

    def hparams(self) -> list[nn.Parameter]:
        return list(self.combiner.parameters())

    def project(self) -> None:
        self.combiner.clamp_()

    def task_names(self, tasks: TaskSet) -> list[str]:
        return [tasks.primary.name, *self._task_aux]

    def objective(self, terms: LossTerms) -> Tensor:
        extra = dict(zip(self._aux_fns, extra_loss_values(self._model, terms, self._aux_fns, "AuxL")))
        matrix = loss_matrix(terms, self.loss_names, extra)
        self._last_mean = matrix.detach().mean(0)
        combined = self.combiner(matrix.to(next(self.combiner.parameters()).dtype)).mean()
        if self.skip:
            combined = combined + terms.mean(terms.primary)
        return combined

    def effective_weights(self, losses: Tensor | None = None) -> dict[str, float]:
        """``∂(skip·ℓ_goal + h(ℓ))/∂ℓ_k`` at the loss vector `losses` (default: the last batch's
        mean): the weight each loss has locally (for the linear net, exactly w, plus 1 for the
        primary loss with the skip connection)."""
        point = losses if losses is not None else self._last_mean
        if point is None:
            return {}
        with torch.enable_grad():
            x = point.detach().reshape(1, -1).to(next(self.combiner.parameters()).dtype).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.combiner(x).sum(), x)
        out = {name: float(grad[0, i]) for i, name in enumerate(self.loss_names)}
        primary = self.tasks.primary.name
        if self.skip:
            out[primary] = out.get(primary, 0.0) + 1.0
        return out

    def trace(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"weight/{k}": v for k, v in self.effective_weights().items()}
        out.update(super().trace())  # the last upper step's diagnostics, as upper/<name>
        return out
