"""The MixUp family as auxiliary tasks (DTG-AuxL Table 5): MixUp, F-MixUp, Auto-Mix, Auto-F-Mix.

A mixed primary batch (inputs or backbone features, with mixed labels) is one more loss next to
the primary and auxiliary losses. Nothing here changes the data pipeline or θ directly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..tasks import PRIMARY_STREAM, Task
from .base import LossTerms, Method, SetupInfo
from .upper import UpperLevel
from .bilevel import BilevelMethod
from .generators import label_vector, labelled, soft_target_loss

__all__ = ["MixUp", "FMixUp", "AutoMix", "AutoFMix", "mix", "mixed_loss", "SPACES", "check_input_space"]

#: Where samples are mixed: the model's inputs (MixUp, Zhang et al. 2018) or the backbone's output
#: features (F-MixUp: manifold MixUp, Verma et al. 2019, at the last shared layer).
SPACES = ("input", "feature")


def mix(a: Tensor, b: Tensor, lam: Tensor | float) -> Tensor:
    """λ·a + (1 − λ)·b, with λ a number, a 0-dim tensor or one value per sample ``[B]``.

    Example:
        >>> mix(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]]), 0.25).tolist()
        [[2.5, 5.0]]
    """
    if isinstance(lam, Tensor) and lam.dim() == 1:
        lam = lam.reshape(-1, *([1] * (a.dim() - 1))).to(a.dtype)
    return lam * a + (1 - lam) * b


def mixed_loss(model: nn.Module, terms: LossTerms, task: Task, perm: Tensor, lam: Tensor | float, space: str) -> Tensor:
    """Mean primary loss of the mixed batch: sample i mixed with sample ``perm[i]`` of the primary stream.

    Input space: the model is run on ``mix(x, x[perm], λ)``; feature space: the primary head on
    ``mix(f, f[perm], λ)`` with f the batch's backbone features (graph to θ kept). The target is
    ``mix(y, y[perm], λ)`` with class labels one-hot (soft cross-entropy); pairs with a missing
    primary label are left out.
    """
    targets = terms.targets[PRIMARY_STREAM]
    y = targets[task.name]
    perm = perm.to(y.device)
    if space == "input":
        x = terms.inputs.get(PRIMARY_STREAM)
        if x is None:
            raise ValueError("Input-space MixUp needs the batch inputs (LossTerms.inputs['primary']); build terms with compute_terms.")
        _, outs = model(mix(x, x[perm], lam), [task.name])
        out = outs[task.name]
    elif space == "feature":
        f = terms.features[PRIMARY_STREAM]
        out = model.head_forward(mix(f, f[perm], lam), [task.name])[task.name]
    else:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}.")
    vec = label_vector(task, y, out.dtype if out.is_floating_point() else torch.float32)
    target = mix(vec, vec[perm], lam)
    mask = (labelled(y) & labelled(y)[perm]).to(out.dtype)
    loss = soft_target_loss(task, out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, target)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def check_input_space(method: str, space: str, info: SetupInfo) -> None:
    """Input-space mixing needs real-valued inputs: integer inputs (field ids, token ids) are refused.

    Reads the training inputs' dtype the Trainer passes (``info.extra["input_dtype"]``); a
    hand-made set-up without it is not checked here.
    """
    dtype = info.extra.get("input_dtype")
    if space == "input" and dtype is not None and not dtype.is_floating_point and not dtype.is_complex:
        alternative = {"mixup": "f-mixup", "auto-mix": "auto-f-mix"}.get(method, "the feature-space variant")
        raise ValueError(
            f"{method!r} mixes the model's inputs, but they are integers ({dtype}: e.g. the field ids AutoInt "
            f"embeds), and mixing ids means nothing; use {alternative!r}, which mixes the backbone's features."
        )


class MixUp(Method):
    """MixUp as an auxiliary task (DTG §4.2.2 / Table 5, "MixUp"; Zhang et al., ICLR 2018).

    Lower objective: ``L_p + aux_weight·Σ_i L_ai + weight·L_mix`` with L_mix the primary loss of
    the mixed batch (`mixed_loss`), λ ~ Beta(`alpha`, `alpha`) drawn once per batch (Zhang et
    al.'s implementation; ``per_sample=True`` draws one per sample) and the partner a shuffled
    batch. The given auxiliary tasks keep weight `aux_weight` (1, as in Equal: DTG's table
    compares MixUp used *as an auxiliary task*). Input space costs one more forward-backward of
    the model on the mixed batch.

    Args:
        alpha: Beta(α, α) parameter (Zhang et al.: 0.2–1; 1 = uniform λ).
        weight: weight of the mixed-batch loss.
        aux_weight: weight of every given auxiliary loss.
        per_sample: one λ per sample instead of one per batch.

    Example:
        >>> MixUp().space, FMixUp().space
        ('input', 'feature')
    """

    name = "mixup"
    space = "input"

    def __init__(self, alpha: float = 1.0, weight: float = 1.0, aux_weight: float = 1.0, per_sample: bool = False):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 (Beta(alpha, alpha)), got {alpha!r}.")
        if not weight >= 0 or not aux_weight >= 0:
            raise ValueError(f"weight and aux_weight must be >= 0, got {weight!r}, {aux_weight!r}.")
        self.alpha = float(alpha)
        self.weight = float(weight)
        self.aux_weight = float(aux_weight)
        self.per_sample = bool(per_sample)

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        check_input_space(self.name, self.space, info)
        self._primary = info.tasks.primary
        self._rng = torch.Generator().manual_seed(int(info.seed) * 1000003 + 4421)
        self._np_rng = np.random.default_rng(int(info.seed) + 4421)
        self._last_lam = math.nan

    def draw(self, batch: int) -> tuple[Tensor, Tensor]:
        """(partner permutation, λ) for a batch: λ a 0-dim tensor, or ``[B]`` with `per_sample`."""
        perm = torch.randperm(batch, generator=self._rng)
        lam = self._np_rng.beta(self.alpha, self.alpha, size=batch if self.per_sample else None)
        return perm, torch.as_tensor(lam, dtype=torch.float32)

    def objective(self, terms: LossTerms) -> Tensor:
        total = terms.mean(terms.primary)
        for name in terms.auxiliary:
            total = total + self.aux_weight * terms.mean(name)
        batch = terms.losses[terms.primary].shape[0]
        perm, lam = self.draw(batch)
        lam = lam.to(terms.losses[terms.primary].device)
        self._last_lam = float(lam.mean())
        return total + self.weight * mixed_loss(self._model, terms, self._primary, perm, lam, self.space)

    def trace(self) -> dict[str, Any]:
        return {"lambda": self._last_lam}


class FMixUp(MixUp):
    """MixUp in feature space (DTG Table 5, "F-MixUp"; manifold MixUp, Verma et al., ICML 2019).

    Mixes the backbone's output features (the last shared layer, where DTG's generator works)
    rather than a randomly chosen hidden layer as manifold MixUp does; no extra forward pass.
    """

    name = "f-mixup"
    space = "feature"


class AutoMix(BilevelMethod):
    """MixUp with the mixing weight and the task weights learned bi-level (DTG Table 5, "Auto-Mix").

    "The linear weight of MixUp is learned automatically with the bi-level optimization, and the
    task weights are also learnable, i.e., utilizing learnable MixUp to replace our joint
    generator" (DTG §4.2.2). Lower objective ``L_p + Σ_i w_i L_ai + w_mix·L_mix(λ)`` with one
    learned λ = sigmoid(ℓ) for every pair (the partner is still a shuffled batch) and w ≥ 0 by
    projection; the upper step is the shared implicit gradient (as DTG's, with no regulariser).

    λ starts at `init_lam` = 0.75, not 0.5: with random pairs the expected loss is symmetric in
    λ ↔ 1 − λ, so 0.5 is a stationary point the hypergradient could not leave; 0.75 is the mean
    of max(λ, 1 − λ) under MixUp's usual Beta(1, 1).

    Args:
        init_lam: initial λ in (0, 1).
        init_weight: initial task weights.
        upper_data: ``"dev"`` or ``"train"`` (see `auxnb.methods.bilevel.upper_context`).
        upper, upper_keywords: the `UpperLevel` (default `default_upper`) and its fields as keywords,
            which override ``upper``'s (see `BilevelMethod`).
    """

    name = "auto-mix"
    #: the constructor's upper level (see `BilevelMethod`; each field is also a keyword)
    default_upper = UpperLevel(lower_steps=5, terms=3, hyper_lr="lower", upper_data="dev",
                               upper_optimizer="adam", upper_lr=1e-2, upper_momentum=0.9, clip=10.0)
    space = "input"

    def __init__(
        self,
        *,
        init_lam: float = 0.75,
        init_weight: float = 1.0,

        upper: UpperLevel | Mapping[str, Any] | None = None,
        **upper_keywords: Any,
    ):
        super().__init__(upper=upper, **upper_keywords)
        if not 0 < init_lam < 1:
            raise ValueError(f"init_lam must lie in (0, 1), got {init_lam!r}.")
        if not init_weight >= 0:
            raise ValueError(f"init_weight must be >= 0, got {init_weight!r}.")
        self.init_lam = float(init_lam)
        self.init_weight = float(init_weight)

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        check_input_space(self.name, self.space, info)
        self._upper_opt = None
        self._primary = info.tasks.primary
        self._aux = [t.name for t in info.tasks.auxiliary]
        p = next(model.parameters())
        logit = math.log(self.init_lam / (1 - self.init_lam))
        self.lam_logit = nn.Parameter(torch.tensor(logit, device=p.device, dtype=p.dtype))
        self.task_weights = nn.Parameter(torch.full((len(self._aux) + 1,), self.init_weight, device=p.device, dtype=p.dtype))
        self._rng = torch.Generator().manual_seed(int(info.seed) * 1000003 + 4421)
        # the upper step's partners come from a generator of their own (`upper_step`)
        self._rng_upper = torch.Generator().manual_seed(int(info.seed) * 1000003 + 4441)

    def upper_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """`BilevelMethod.upper_step`, its mixed batches' partners drawn from the upper level's own generator, so
        that an upper step leaves the lower level's partners where they were (`BilevelMethod.upper_generators`)."""
        with self.upper_generators("_rng"):
            return super().upper_step(model, context)

    def hparams(self) -> list[nn.Parameter]:
        return [self.lam_logit, self.task_weights]

    def project(self) -> None:
        self.task_weights.clamp_(min=0.0)

    @property
    def lam(self) -> Tensor:
        return torch.sigmoid(self.lam_logit)

    def permutation(self, batch: int) -> Tensor:
        """The partner of each sample: a shuffled batch."""
        return torch.randperm(batch, generator=self._rng)

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        w = self.task_weights if create_graph else self.task_weights.detach()
        lam = self.lam if create_graph else self.lam.detach()
        loss = terms.mean(terms.primary)
        for name in terms.auxiliary:
            loss = loss + w[self._aux.index(name)] * terms.mean(name)
        perm = self.permutation(terms.losses[terms.primary].shape[0])
        loss = loss + w[-1] * mixed_loss(self._model, terms, self._primary, perm, lam, self.space)
        grads = torch.autograd.grad(self.scaled(loss), list(params), create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def trace(self) -> dict[str, Any]:
        out = dict(super().trace())
        out["lambda"] = float(self.lam.detach())
        for i, name in enumerate(self._aux):
            out[f"weight/{name}"] = float(self.task_weights[i].detach())
        out["weight/mix"] = float(self.task_weights[-1].detach())
        return out


class AutoFMix(AutoMix):
    """Auto-Mix in feature space (DTG Table 5, "Auto-F-Mix"): learned λ and task weights, features mixed."""

    name = "auto-f-mix"
    space = "feature"
