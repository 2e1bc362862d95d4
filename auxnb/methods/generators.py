"""DTG-AuxL's joint generator (Chen et al., NeurIPS 2023, §3.2) and the label helpers shared with MixUp.

Modules here map source features and source labels to a generated feature and a generated label;
they never run the task model, never compute a task loss over a batch and never touch θ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import MISSING_CLASS, Task

__all__ = [
    "FeatureGenerator",
    "LabelGenerator",
    "LabelEmbedding",
    "LabelSpec",
    "label_spec",
    "label_vector",
    "normalise_label",
    "label_bias",
    "instance_regulariser",
    "mean_pairwise_cosine",
    "soft_target_loss",
    "labelled",
]


def _mlp(in_dim: int, out_dim: int, hidden: int, layers: int, zero_last: bool, generator: torch.Generator | None) -> nn.Sequential:
    """``layers`` Linear layers with ReLU between them; the last one starts at zero when `zero_last`."""
    if layers < 1:
        raise ValueError(f"An MLP needs at least one layer, got layers={layers}.")
    widths = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        bound = 1.0 / a**0.5  # torch's default uniform(±1/sqrt(fan_in)), drawn from our generator
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=generator)
            lin.bias.uniform_(-bound, bound, generator=generator)
        mods.append(lin)
        if i < layers - 1:
            mods.append(nn.ReLU())
    if zero_last:
        # the nonlinear term starts at exactly zero: the generator starts as its linear term
        with torch.no_grad():
            mods[-1].weight.zero_()
            mods[-1].bias.zero_()
    return nn.Sequential(*mods)


# --------------------------------------------------------------------------- feature generator


class FeatureGenerator(nn.Module):
    """DTG feature generator (§3.2.1): per-dimension softmax masks over the sources + an MLP.

    For S source features ``f_1..f_S`` of dimension d (the primary feature, the auxiliary ones
    and, in Share-Input mode, the partner's)::

        f_gl = Σ_i m̂_i * f_i,  m̂_i[k] = exp(m_i[k]) / Σ_j exp(m_j[k])     (DTG Eq. 3)
        f_gn = MLP_F([f_1; ...; f_S])                                     (DTG Eq. 4)
        f_g  = f_gl + f_gn

    Choices the paper leaves open: the masks start at 0 (every source weighted 1/S in every
    dimension); MLP_F has `layers` Linear layers of width `hidden` (paper: layers searched in
    {2, 3, 4}; width not given, default d) with ReLU between them and its last layer starts at
    zero, so the generator starts as the plain average of its sources and the hypergradient
    grows the nonlinear term from there.

    Args:
        num_sources: S.
        dim: feature size d.
        nonlinear: include f_gn (Table 4's "w/o F-nonlinear" is ``False``).
        hidden, layers: MLP_F shape.
        generator: RNG for the initial MLP weights.

    Example:
        >>> g = FeatureGenerator(2, 3, nonlinear=False)
        >>> g(torch.stack([torch.ones(1, 3), 3 * torch.ones(1, 3)])).tolist()
        [[2.0, 2.0, 2.0]]
    """

    def __init__(self, num_sources: int, dim: int, *, nonlinear: bool = True, hidden: int | None = None, layers: int = 2,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_sources < 1 or dim < 1:
            raise ValueError(f"FeatureGenerator needs num_sources >= 1 and dim >= 1, got {num_sources}, {dim}.")
        self.num_sources, self.dim = int(num_sources), int(dim)
        self.masks = nn.Parameter(torch.zeros(num_sources, dim))
        self.mlp = _mlp(num_sources * dim, dim, hidden or dim, layers, True, generator) if nonlinear else None

    def normalised_masks(self) -> Tensor:
        """m̂ ``[S, d]``: softmax over the sources in every dimension (DTG Eq. 3); columns sum to 1."""
        return torch.softmax(self.masks, dim=0)

    def forward(self, sources: Tensor) -> Tensor:
        """Generated features ``[B, d]`` from ``sources [S, B, d]``."""
        if sources.dim() != 3 or sources.shape[0] != self.num_sources or sources.shape[2] != self.dim:
            raise ValueError(
                f"FeatureGenerator expects sources of shape [{self.num_sources}, B, {self.dim}], got {tuple(sources.shape)}."
            )
        masks = self.normalised_masks().to(sources.dtype)
        out = (masks[:, None, :] * sources).sum(0)
        if self.mlp is not None:
            flat = sources.permute(1, 0, 2).reshape(sources.shape[1], -1)
            out = out + self.mlp(flat)
        return out


# --------------------------------------------------------------------------- label generator


@dataclass(frozen=True)
class LabelSpec:
    """How one task's label enters the label generator.

    ``kind="categorical"`` (classification, binary): an index into ``categories`` rows, or a
    ``[B, categories]`` distribution (soft labels); ``kind="numeric"`` (regression): a real value.
    """

    name: str
    kind: str
    categories: int

    def __post_init__(self) -> None:
        if self.kind not in ("categorical", "numeric"):
            raise ValueError(f"LabelSpec {self.name!r}: kind must be 'categorical' or 'numeric', got {self.kind!r}.")
        if self.categories < 1:
            raise ValueError(f"LabelSpec {self.name!r}: categories must be >= 1, got {self.categories}.")


def label_spec(task: Task, bins: int = 10) -> LabelSpec:
    """The label-generator input spec of a task: classification → d_i = classes, binary → 2,
    regression → numeric with d_i = H = `bins` (DTG §3.2.2: "H ... fixed to 10")."""
    if task.kind == "classification":
        return LabelSpec(task.name, "categorical", task.out_dim)
    if task.kind == "binary":
        return LabelSpec(task.name, "categorical", 2)
    return LabelSpec(task.name, "numeric", int(bins))


def labelled(y: Tensor) -> Tensor:
    """Which labels are present: not ``MISSING_CLASS`` (integer labels), not NaN (real labels);
    soft labels ``[B, C]`` are always present."""
    if y.dim() == 2 and y.is_floating_point():
        return torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    if y.is_floating_point():
        return ~torch.isnan(y.reshape(y.shape[0], -1)[:, 0])
    return y != MISSING_CLASS


class LabelEmbedding(nn.Module):
    """One task's embedding table E_i (``d_i × m``): DTG Eq. 5 (categorical) and Eq. 6 (numeric).

    Categorical: ``E_i[y]`` (a soft label ``[B, d_i]`` gives ``y @ E_i``, the same for one-hot
    rows). Numeric: ``c = softmax(Linear(y)) ∈ R^H`` and ``Σ_k c[k] E_i[k]``. A missing label
    embeds to the zero vector (it carries no information; the paper has no missing labels).

    Example:
        >>> e = LabelEmbedding(LabelSpec("t", "categorical", 3), 2)
        >>> with torch.no_grad():
        ...     _ = e.table.copy_(torch.tensor([[1., 0.], [0., 1.], [2., 2.]]))
        >>> e(torch.tensor([2, -1])).tolist()
        [[2.0, 2.0], [0.0, 0.0]]
    """

    def __init__(self, spec: LabelSpec, dim: int, *, init_std: float = 0.1, generator: torch.Generator | None = None):
        super().__init__()
        self.spec = spec
        self.table = nn.Parameter(torch.randn(spec.categories, dim, generator=generator) * init_std)
        self.bins = nn.Linear(1, spec.categories) if spec.kind == "numeric" else None
        if self.bins is not None:
            with torch.no_grad():
                self.bins.weight.uniform_(-1.0, 1.0, generator=generator)
                self.bins.bias.uniform_(-1.0, 1.0, generator=generator)

    def bin_weights(self, y: Tensor) -> Tensor:
        """c = softmax(Linear(y)) ``[B, H]`` for numeric labels (DTG Eq. 6)."""
        assert self.bins is not None
        value = torch.nan_to_num(y.reshape(y.shape[0], 1).to(self.table.dtype), nan=0.0)
        return torch.softmax(self.bins(value), dim=-1)

    def forward(self, y: Tensor) -> Tensor:
        present = labelled(y)
        if self.spec.kind == "numeric":
            emb = self.bin_weights(y) @ self.table
        elif y.dim() == 2 and y.is_floating_point():
            emb = y.to(self.table.dtype) @ self.table
        else:
            idx = y.reshape(-1)
            idx = torch.nan_to_num(idx.float(), nan=0.0).long() if idx.is_floating_point() else idx.long()
            emb = self.table[torch.where(present, idx, torch.zeros_like(idx))]
        return torch.where(present[:, None], emb, torch.zeros_like(emb))


class LabelGenerator(nn.Module):
    """DTG label generator (§3.2.2): linear term Σ_i E_i(y_i) plus an MLP over a second embedding set.

    ::

        y_gl = Σ_{slots s} E_{task(s)}(y_s)                     (DTG Eq. 5–6, linear term)
        y_gn = MLP_L([EN_{task(1)}(y_1); ...; EN_{task(S)}(y_S)])   (DTG Eq. 7)
        y_g  = y_gl + y_gn                                       (DTG Eq. 8)

    A *slot* is one input label; in Share-Input mode the partner's labels are slots of the same
    tasks and share their tables (§3.2.3, detail i). ``m`` is the generated label's size (the
    primary task's: classes, or 1 for regression). Choices the paper leaves open: tables start
    N(0, `init_std`²) (small, so norm(y_g) starts near uniform and the label bias dominates); the
    numeric Linear(1 → H) starts uniform(±1); MLP_L has `layers` layers of width `hidden`
    (default 2·m_n) and its last layer starts at zero.

    Args:
        specs: one `LabelSpec` per task (unique names).
        slots: the task name of each input label, in order.
        out_dim: m.
        nonlinear: include y_gn (Table 4's "w/o L-nonlinear" is ``False``).
        embed_dim: m_n (paper: searched in {32, 64}).
        hidden, layers: MLP_L shape.
        init_std: initial scale of the tables.
    """

    def __init__(self, specs: Sequence[LabelSpec], slots: Sequence[str], out_dim: int, *, nonlinear: bool = True,
                 embed_dim: int = 32, hidden: int | None = None, layers: int = 2, init_std: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        by_name = {s.name: s for s in specs}
        if len(by_name) != len(specs):
            raise ValueError("LabelGenerator: duplicate task names in specs.")
        unknown = [s for s in slots if s not in by_name]
        if unknown:
            raise ValueError(f"LabelGenerator: slots {unknown} have no LabelSpec; specs are {list(by_name)}.")
        self.slots = tuple(slots)
        self.out_dim = int(out_dim)
        self.linear = nn.ModuleDict({s.name: LabelEmbedding(s, out_dim, init_std=init_std, generator=generator) for s in specs})
        if nonlinear:
            self.embed = nn.ModuleDict({s.name: LabelEmbedding(s, embed_dim, init_std=init_std, generator=generator) for s in specs})
            self.mlp = _mlp(len(self.slots) * embed_dim, out_dim, hidden or 2 * embed_dim, layers, True, generator)
        else:
            self.embed = None
            self.mlp = None

    def linear_term(self, labels: Sequence[Tensor]) -> Tensor:
        """y_gl ``[B, m]``: the sum of the slots' embeddings (DTG Eq. 5–6)."""
        return torch.stack([self.linear[s](y) for s, y in zip(self.slots, labels)]).sum(0)

    def forward(self, labels: Sequence[Tensor]) -> Tensor:
        """y_g ``[B, m]`` (DTG Eq. 8) from one label tensor per slot."""
        if len(labels) != len(self.slots):
            raise ValueError(f"LabelGenerator expects {len(self.slots)} label tensors (slots {self.slots}), got {len(labels)}.")
        out = self.linear_term(labels)
        if self.mlp is not None:
            emb = torch.cat([self.embed[s](y) for s, y in zip(self.slots, labels)], dim=-1)
            out = out + self.mlp(emb)
        return out


# --------------------------------------------------------------------------- label bias and normalisation


def label_vector(task: Task, y: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A primary label as a vector in the generated label's space ``[B, m]``: one-hot for class
    indices (a soft label passes through), the value itself for binary / regression. Missing
    labels give zeros (callers mask those samples)."""
    if task.kind == "classification":
        if y.dim() == 2 and y.is_floating_point():
            return y.to(dtype)
        present = y != MISSING_CLASS
        onehot = F.one_hot(torch.where(present, y, torch.zeros_like(y)).long(), task.out_dim).to(dtype)
        return onehot * present[:, None].to(dtype)
    value = y.reshape(y.shape[0], 1).to(dtype)
    return torch.nan_to_num(value, nan=0.0)


def normalise_label(task: Task, y_g: Tensor) -> Tensor:
    """norm(y_g) of DTG Eq. 9: softmax for classification; for regression with
    ``task.label_range = (a, b)`` the scaled sigmoid ``(b − a)·sigmoid(y_g) + a``; the identity
    for regression without a range (the paper always has one); sigmoid for a binary task.

    Example:
        >>> t = Task("rating", "regression", label_range=(1.0, 5.0), primary=True)
        >>> normalise_label(t, torch.tensor([[0.0], [1e6]])).tolist()
        [[3.0], [5.0]]
    """
    if task.kind == "classification":
        return torch.softmax(y_g, dim=-1)
    if task.kind == "binary":
        return torch.sigmoid(y_g)
    if task.label_range is not None:
        a, b = task.label_range
        return (b - a) * torch.sigmoid(y_g) + a
    return y_g


def label_bias(y_primary: Tensor, y_norm: Tensor, alpha: Tensor | float) -> Tensor:
    """ŷ = α·y_p + (1 − α)·norm(y_g) (DTG Eq. 9; Eq. 10 passes the β-mix of two primary labels as y_p)."""
    return alpha * y_primary + (1 - alpha) * y_norm


def mean_pairwise_cosine(y: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean of cos(y_j, y_j') over the ordered pairs j ≠ j' of the rows of ``y [B, m]`` (0 for B < 2)."""
    b = y.shape[0]
    if b < 2:
        return y.sum() * 0.0
    unit = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    gram = unit @ unit.T
    return (gram.sum() - gram.diagonal().sum()) / (b * (b - 1))


def instance_regulariser(y_g: Tensor, kind: str, reduction: str = "mean") -> Tensor:
    """DTG Eq. 14 on the parameterised labels y_g ``[B, m]`` (Eq. 8, before norm and bias).

    - ``kind="categorical"``: Σ_j Σ_{j'≠j} cos(y_g,j, y_g,j') — ``reduction="sum"`` is Eq. 14 as
      printed; ``"mean"`` (default) divides by the B(B−1) pairs so the weight does not depend on
      the batch size (this is the mean pairwise cosine, in [−1, 1]).
    - ``kind="numeric"`` (m = 1): ``−Σ_j ȳ_j log ȳ_j`` with ``ȳ = softmax over the batch of y_g``,
      the entropy of that distribution, as printed. Minimising it spreads the generated values
      apart (equal values give the maximum, log B). ``"mean"`` divides by log B (in [0, 1]).

    Example:
        >>> y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> round(float(instance_regulariser(y, "categorical", "sum")), 4)  # 2·(0 + 2·(1/√2))
        2.8284
    """
    b = y_g.shape[0]
    if kind == "categorical":
        total = mean_pairwise_cosine(y_g)
        return total * (b * (b - 1)) if reduction == "sum" else total
    if kind == "numeric":
        p = torch.softmax(y_g.reshape(b), dim=0)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
        if reduction == "sum" or b < 2:
            return entropy
        return entropy / torch.log(torch.tensor(float(b), dtype=y_g.dtype, device=y_g.device))
    raise ValueError(f"instance_regulariser: kind must be 'categorical' or 'numeric', got {kind!r}.")


def soft_target_loss(task: Task, output: Tensor, target: Tensor) -> Tensor:
    """Per-sample primary loss against a generated target ``[B, m]`` (soft cross-entropy for
    classification, logistic loss on a probability for binary, squared error for regression)."""
    if task.kind == "classification":
        return -(target * F.log_softmax(output, dim=-1)).sum(-1)
    out = output.reshape(output.shape[0], -1)[:, 0]
    tgt = target.reshape(target.shape[0], -1)[:, 0].to(out.dtype)
    if task.kind == "binary":
        return F.binary_cross_entropy_with_logits(out, tgt, reduction="none")
    return (out - tgt) ** 2
