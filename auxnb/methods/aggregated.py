"""Gradient aggregators from TorchJD as auxiliary-learning baselines, behind one adapter method.

The aggregators are TorchJD's (``pip install "auxnb[aggregators]"``), called, never re-written;
this module only builds the matrix of per-task gradients and hands the result to the Trainer.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .base import LossTerms, Method, SetupInfo

__all__ = ["Aggregated", "AGGREGATORS", "INSTALL_HINT", "PRIMARY_MODES"]

#: registry-style name -> (TorchJD class name, the aggregator's paper, default options)
AGGREGATORS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "pcgrad": ("PCGrad", "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020", {}),
    # c = 0.4: the value CAGrad's paper and code use for NYUv2 / CityScapes
    "cagrad": ("CAGrad", "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021",
               {"c": 0.4}),
    "nash-mtl": ("NashMTL", "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022", {}),
    "imtl-g": ("IMTLG", "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021", {}),
    "aligned-mtl": ("AlignedMTL", "Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023",
                    {}),
    "upgrad": ("UPGrad", "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, 2024 (arXiv:2406.16232)", {}),
    "mgda": ("MGDA", "Désidéri, C. R. Math. 2012; Sener & Koltun, Multi-Task Learning as Multi-Objective "
             "Optimization, NeurIPS 2018", {}),
    "dualproj": ("DualProj", "Quinton & Rey 2024 (arXiv:2406.16232), the dual-cone projection of GEM "
                 "(Lopez-Paz & Ranzato, NeurIPS 2017)", {}),
}

#: how the primary task's priority enters (see `Aggregated`)
PRIMARY_MODES = ("aggregate", "keep")

INSTALL_HINT = 'pip install "auxnb[aggregators]" (TorchJD 0.18 with the solvers its aggregators need: quadprog, cvxpy, ecos)'


def _torchjd_aggregation():
    if importlib.util.find_spec("torchjd") is None:
        raise ImportError(f"The 'aggregator' method calls TorchJD's aggregators, and torchjd is not installed: {INSTALL_HINT}.")
    import torchjd.aggregation

    return torchjd.aggregation


class Aggregated(Method):
    """A TorchJD gradient aggregator over the task gradients, as an auxiliary-learning baseline.

    Every step takes one gradient per task on the shared parameters (K + 1 backward passes for K
    auxiliary tasks, batched by `auxnb.hypergrad.per_loss_grads`, as GCS), stacks them as the rows
    of a Jacobian matrix and hands the matrix to the aggregator, whose output vector is the shared
    parameters' direction. Every other parameter (the task heads) gets the plain sum of the task
    gradients, which on a head is its own task's gradient: the aggregators resolve conflicts
    between tasks, and a head has none. The aggregators are TorchJD's (Quinton & Rey, "Jacobian
    Descent for Multi-Objective Optimization", 2024, arXiv:2406.16232; https://torchjd.org),
    taken by name and never re-written:

    - ``"pcgrad"`` PCGrad (Yu et al., NeurIPS 2020): each gradient projected off the others it
      conflicts with, in a random order (drawn here from a generator seeded by the run's seed and
      the step, so the process-wide RNG is untouched and a resumed run repeats it);
    - ``"cagrad"`` CAGrad (Liu et al., NeurIPS 2021), ``c=0.4``;
    - ``"nash-mtl"`` Nash-MTL (Navon et al., ICML 2022): stateful, its state is checkpointed;
    - ``"imtl-g"`` IMTL-G (Liu et al., ICLR 2021);
    - ``"aligned-mtl"`` Aligned-MTL (Senushkin et al., CVPR 2023);
    - ``"upgrad"`` UPGrad (Quinton & Rey 2024), the default;
    - ``"mgda"`` MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018): the minimum-norm point of
      the gradients' convex hull;
    - ``"dualproj"`` DualProj (Quinton & Rey 2024): the mean projected onto the gradients' dual cone.

    **The primary task's priority.** ``primary="aggregate"`` (default) aggregates all K + 1
    gradients as equals, as the auxiliary-learning papers that report these aggregators as
    baselines ran them (AuxiNash, ForkMerge: multi-task aggregators applied to the primary and
    auxiliary tasks alike). ``primary="keep"`` never touches the primary gradient: the shared
    direction is ``∇L_primary + A(∇L_aux1, …, ∇L_auxK)``, the aggregator resolving conflicts
    among the auxiliary gradients only (with one auxiliary task this is Equal).

    A task with no labelled sample in the batch (semi-supervised settings) has an exactly zero
    gradient and carries no information; it is left out of that step's matrix (``trace()``'s
    ``aggregator/rows`` counts the rows aggregated) instead of letting, e.g., MGDA's minimum-norm
    point collapse to 0. Nash-MTL keeps every row (its solver's state has a fixed task count).

    Args:
        aggregator: one of `AGGREGATORS` (case-insensitive; ``"nashmtl"``-style spellings without
            the dash are accepted).
        primary: ``"aggregate"`` or ``"keep"`` (above).
        options: keyword arguments for the TorchJD aggregator, on top of the defaults above
            (e.g. ``{"c": 0.5}`` for CAGrad, ``{"max_norm": 1.0}`` for Nash-MTL).
        shared_prefix: the shared parameters' name prefix (default: those under ``model.backbone``).
        group_aux: aggregate the sum of the auxiliary losses as one row (2 rows and 2 backward passes
            a step instead of K + 1): what the JTDS paper (§3.2) did for its gradient baselines on
            CUB's 312 attribute tasks, and what the ``cub-attributes-312`` setting uses; with
            K + 1 = 313 rows UPGrad alone solves 313 quadratic programs of size 313 per step.

    Example:
        >>> from auxnb.methods import get
        >>> get("aggregator", aggregator="PCGrad")
        Aggregated(aggregator='pcgrad', primary='aggregate', options={}, shared_prefix='backbone.', group_aux=False)
    """

    name = "aggregator"

    def __init__(self, aggregator: str = "upgrad", primary: str = "aggregate", options: Mapping[str, Any] | None = None,
                 shared_prefix: str = "backbone.", group_aux: bool = False):
        key = aggregator.lower().replace("_", "-") if isinstance(aggregator, str) else aggregator
        spellings = {k.replace("-", ""): k for k in AGGREGATORS}
        key = spellings.get(key, key) if isinstance(key, str) else key
        if key not in AGGREGATORS:
            raise ValueError(f"Unknown aggregator {aggregator!r}; use one of {', '.join(AGGREGATORS)}.")
        if primary not in PRIMARY_MODES:
            raise ValueError(f"primary must be one of {PRIMARY_MODES}, got {primary!r}: 'aggregate' treats the primary "
                             "gradient as one more row, 'keep' adds it whole to the aggregated auxiliary gradients.")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict of the TorchJD aggregator's keyword arguments, got {options!r}.")
        self.aggregator = key
        self.primary = primary
        self.options = dict(options or {})
        self.shared_prefix = shared_prefix
        self.group_aux = bool(group_aux)
        aggregation = _torchjd_aggregation()  # a missing install is reported here, before any work
        self._cls = getattr(aggregation, AGGREGATORS[key][0])
        if key != "nash-mtl":  # Nash-MTL needs the task count: built (and checked) in setup
            self._build(None)

    def _build(self, n_rows: int | None) -> nn.Module:
        kwargs = {**AGGREGATORS[self.aggregator][2], **self.options}
        if self.aggregator == "nash-mtl":
            kwargs["n_tasks"] = n_rows
        try:
            self._aggregate = self._cls(**kwargs)
        except ImportError as err:  # TorchJD's own optional solvers (cvxpy, ecos)
            raise ImportError(f"{err} With auxnb: {INSTALL_HINT}.") from None
        except TypeError as err:
            raise TypeError(f"aggregator {self.aggregator!r} ({AGGREGATORS[self.aggregator][0]}): {err}; "
                            f"check options={self.options!r}.") from None
        return self._aggregate

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        shared = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(self.shared_prefix)]
        if not shared:
            raise ValueError(f"The aggregator found no shared parameters whose names start with {self.shared_prefix!r}; "
                             "pass shared_prefix= naming the shared part of the model.")
        self._shared_ids = {id(p) for p in shared}
        n_aux = min(len(info.tasks.names) - 1, 1) if self.group_aux else len(info.tasks.names) - 1
        n_rows = n_aux + 1 if self.primary == "aggregate" else n_aux
        if n_rows < 1:
            raise ValueError("primary='keep' needs at least one auxiliary task to aggregate; this task set has none.")
        self._build(n_rows)  # a fresh aggregator per run: stateful ones (Nash-MTL) start anew
        self._seed = int(info.seed)
        self._steps = 0
        self._rows = 0

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        from ..hypergrad import per_loss_grads

        names = [terms.primary, *terms.auxiliary]
        means = [self.scaled(terms.mean(n)) for n in names]
        labelled = {n: bool(terms.masks[n].any()) for n in names}
        if self.group_aux and len(names) > 2:  # the auxiliary losses as one row (JTDS §3.2)
            labelled["auxiliary"] = any(labelled[n] for n in names[1:])
            names, means = [terms.primary, "auxiliary"], [means[0], torch.stack(means[1:]).sum()]
        grads = per_loss_grads(means, list(params), create_graph=create_graph)
        is_shared = [id(p) in self._shared_ids for p in params]
        # the aggregators are not all positively homogeneous (Nash-MTL's max_norm): aggregate the
        # unscaled gradients, then scale back so the Trainer's division by the fp16 scale is exact
        scale = self._loss_scale
        rows = names if self.primary == "aggregate" else names[1:]
        keep = [n for n in rows if self.aggregator == "nash-mtl" or labelled[n]]
        shared_idx = [i for i, s in enumerate(is_shared) if s]
        total = [sum(g[i] for g in grads) for i in range(len(params))]
        if keep:
            matrix = torch.stack([torch.cat([grads[names.index(n)][i].reshape(-1) for i in shared_idx]) for n in keep])
            vector = self._call(matrix.detach() / scale) * scale
            if self.primary == "keep":
                vector = vector + torch.cat([grads[0][i].reshape(-1) for i in shared_idx]).detach()
        else:  # primary='keep' and no auxiliary task labelled in this batch: the primary gradient alone
            vector = torch.cat([grads[0][i].reshape(-1) for i in shared_idx]).detach()
        offset = 0
        for i in shared_idx:
            n = params[i].numel()
            total[i] = vector[offset:offset + n].view_as(params[i]).to(params[i].dtype)
            offset += n
        self._rows = len(keep)
        self._steps += 1
        return tuple(total)

    def _call(self, matrix: Tensor) -> Tensor:
        # PCGrad draws its order from the process-wide RNG: fork it, seeded by (seed, step), so the
        # run's own random stream is untouched and the same step draws the same order after a resume
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # cvxpy's note that Nash-MTL's problem is not DPP (each solve is compiled anew): a speed
            # remark about TorchJD's formulation, once per step, that the user cannot act on
            warnings.filterwarnings("ignore", message=".*not DPP.*", category=UserWarning)
            torch.manual_seed(self._seed * 1_000_003 + self._steps)
            return self._aggregate(matrix)

    def trace(self) -> dict[str, Any]:
        return {"aggregator/rows": float(getattr(self, "_rows", 0))}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": getattr(self, "_steps", 0)}
        if self.aggregator == "nash-mtl":
            w = self._aggregate.weighting
            state["nash"] = {"step": float(w.step), "prvs_alpha": np.array(w.prvs_alpha, copy=True),
                             "normalization_factor": np.array(w.normalization_factor, copy=True)}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps = int(state["steps"])
        if self.aggregator == "nash-mtl" and "nash" in state:
            w = self._aggregate.weighting
            nash = state["nash"]
            w.prvs_alpha = np.array(nash["prvs_alpha"], copy=True)
            w.normalization_factor = np.array(nash["normalization_factor"], copy=True)
            if nash["step"] > 0:
                # TorchJD builds its convex problem at its first step only; a resumed one is past it
                w._init_optim_problem()
            w.step = nash["step"]
