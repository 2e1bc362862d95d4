"""The upper level as one value: when the upper step runs, how its hypergradient is solved, how φ moves.

`UpperLevel` is a frozen dataclass that every bi-level method takes (``MAOAL(upper=...)``); its
presets (the paper text, the authors' public code, auxnb's recommendation) are instances that can
be printed, compared and stored in a run's config. It never touches a model or a method's φ.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from ..hypergrad import METHODS as HYPERGRAD_METHODS

__all__ = ["UpperLevel", "UPPER_OPTIMIZERS", "UPPER_DATA", "UPPER_FIELDS", "CLIP_MODES", "resolve_upper"]

#: φ optimisers known by name (a callable ``params -> Optimizer`` is accepted too).
UPPER_OPTIMIZERS = ("adam", "sgd")
#: What the upper objective is measured on: the held-out D_dev, or fresh primary training batches.
UPPER_DATA = ("dev", "train")
#: `UpperLevel.clip_mode`: the hypergradient's norm at most `clip` ("max") or exactly `clip` ("fixed")
CLIP_MODES = ("max", "fixed")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class UpperLevel:
    """The bi-level schedule, hypergradient series, solver and φ optimiser, as one frozen value.

    JAXopt keeps "the optimality condition", "the solver" and "when it runs" apart; here the
    condition is the method (how φ enters g(θ, φ)), and this value holds the rest:

    - **schedule**: `lower_steps` (T / M: lower steps between two upper steps), `refit`,
      `upper_data`, `dev_batches`, `dev_in_train` (θ trains on D_train ∪ D_dev throughout, as STL
      and Equal do, while φ is still learned from D_dev: auxnb's option, not the papers', which hold
      D_dev out of θ's training; a method's lower batches are then STL's of the same seed),
      `phi_batches` (training batches the upper step's last product uᵀ∂g/∂φ is averaged over: 1,
      the papers', measures how φ moves the lower gradient on the upper step's one train batch; n
      averages it over that batch and n − 1 more from the upper level's stream, the same u, a
      lower-variance estimate of the same quantity — see `BilevelMethod.upper_step`);
    - **series**: `terms` (K Neumann matvecs, K + 1 summands), `hyper_lr` (η: a number,
      ``"lower"`` = the lower optimiser's current learning rate, or ``"auto"`` = `auto_target` /
      λ_max(J) re-estimated every `auto_every` upper steps by power iteration from the lower
      direction g, stopped when the estimate changes by less than `auto_tol` relative, at most
      20 products) and `leading_eta`;
    - **solver**: `hypergrad` (``"neumann"``, ``"exact"``, ``"cg"`` or a solver
      ``(matvec, b) -> x``), `check_every`, `warm_start` (β ∈ [0, 1], Neumann only: each upper step's
      K iterations start from β times the previous upper step's solution u instead of from 0, so the
      series keeps what it summed before: where J and v stay the same, K more terms each upper step,
      about K/(1 − β) in all; 0, the papers', starts afresh every time; a warm solution that outgrows what a
      convergent series can reach, or is not finite, is solved afresh — `BilevelMethod._keeping_series`);
    - **φ optimiser**: `upper_optimizer` (``"adam"``, ``"sgd"`` or a callable
      ``params -> Optimizer``), `upper_lr`, `upper_momentum` (SGD only), `upper_weight_decay`,
      `clip` (the hypergradient's norm; None: off) and `clip_mode` (``"max"``: scaled down to norm
      `clip` when longer; ``"fixed"``: every hypergradient scaled to norm `clip`, up or down, so that
      φ's step has one length, lr·clip before momentum, whatever the hypergradient's scale;
      a zero hypergradient stays zero; with ``clip=None`` neither applies: the hypergradient as it is).

    `leading_eta` is the one place where the papers and the authors' public code differ in
    kind: the papers' series (MAOAL Eq. 9 / A3) is ``−η · vᵀ Σ_{i=0..K} (I − ηJ)^i ∂g/∂φ``, an
    approximation of the implicit gradient ``−vᵀ J⁻¹ ∂g/∂φ``; the authors' code (MAOAL
    ``gauxlearn/implicit_diff.py``, JTDS and AuxiLearn ``auxilearn/implicit_diff.py``) sums the
    same series without the leading η, i.e. it returns 1/η times that. ``leading_eta=False``
    follows the code. With η = 1 the two agree; with η the lower learning rate (1e-4 … 1e-2) the
    code's φ moves 100–10 000× faster for the same `upper_lr`.

    Presets: `paper_text`, `authors` and `recommended` (per method and experiment). A method
    built with ``upper=`` and upper-level keywords applies the keywords on top of ``upper``
    (``MAOAL(upper=u, upper_lr=0.1)`` is ``MAOAL(upper=u.replace(upper_lr=0.1))``).

    Example:
        >>> u = UpperLevel(lower_steps=5, hyper_lr="lower", leading_eta=False)
        >>> u.replace(clip=None).clip is None, UpperLevel.from_dict(u.to_dict()) == u
        (True, True)
        >>> UpperLevel(terms=-1)
        Traceback (most recent call last):
        ...
        ValueError: terms must be an integer >= 0 (Neumann matvecs; 0 = first order), got -1.
    """

    lower_steps: int = 20
    terms: int = 3
    hyper_lr: float | str = 1.0
    leading_eta: bool = True
    hypergrad: str | Callable = "neumann"
    upper_optimizer: str | Callable = "adam"
    upper_lr: float = 1e-2
    upper_momentum: float = 0.9
    upper_weight_decay: float = 0.0
    clip: float | None = 10.0
    clip_mode: str = "max"
    check_every: int = 0
    auto_every: int = 10
    auto_target: float = 1.0
    auto_tol: float = 1e-2
    upper_data: str = "dev"
    dev_batches: int = 1
    refit: float | None = None
    dev_in_train: bool = False
    phi_batches: int = 1
    warm_start: float = 0.0

    #: where the presets come from (a method name -> a function of the experiment)
    _PRESETS: ClassVar[dict[str, dict[str, Callable[[str | None], "UpperLevel"]]]] = {}

    def __post_init__(self) -> None:
        if not _int(self.lower_steps) or self.lower_steps < 1:
            raise ValueError(f"lower_steps must be an integer >= 1 (lower steps between upper steps), got {self.lower_steps!r}.")
        if not _int(self.terms) or self.terms < 0:
            raise ValueError(f"terms must be an integer >= 0 (Neumann matvecs; 0 = first order), got {self.terms!r}.")
        if not (self.hyper_lr in ("lower", "auto") or (_number(self.hyper_lr) and math.isfinite(self.hyper_lr) and self.hyper_lr > 0)):
            raise ValueError(f"hyper_lr must be a positive number, 'lower' or 'auto', got {self.hyper_lr!r}.")
        if not isinstance(self.leading_eta, bool):
            raise ValueError(f"leading_eta must be True (the papers' −η·Σ…) or False (the authors' code), got {self.leading_eta!r}.")
        if not (callable(self.hypergrad) or self.hypergrad in HYPERGRAD_METHODS):
            raise ValueError(
                f"Unknown hypergrad {self.hypergrad!r}; use one of {', '.join(map(repr, HYPERGRAD_METHODS))} "
                "or a solver (matvec, b) -> x."
            )
        if not (callable(self.upper_optimizer) or self.upper_optimizer in UPPER_OPTIMIZERS):
            raise ValueError(f"Unknown upper_optimizer {self.upper_optimizer!r}; use 'adam', 'sgd' or a callable params -> Optimizer.")
        for name in ("upper_lr", "upper_momentum", "upper_weight_decay"):
            value = getattr(self, name)
            if not (_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (upper_lr=0 freezes φ), got {value!r}.")
        if self.clip is not None and not (_number(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be > 0 or None (no clipping), got {self.clip!r}.")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES} (the hypergradient's norm at most, or exactly, clip), "
                             f"got {self.clip_mode!r}.")
        if not _int(self.check_every) or self.check_every < 0:
            raise ValueError(f"check_every must be an integer >= 0 (0: never), got {self.check_every!r}.")
        if not _int(self.auto_every) or self.auto_every < 1:
            raise ValueError(f"auto_every must be an int >= 1 (upper steps between λ_max estimates), got {self.auto_every!r}.")
        if not (_number(self.auto_target) and 0 < self.auto_target < 2):
            raise ValueError(f"auto_target must lie in (0, 2) so that η·λ_max < 2, got {self.auto_target!r}.")
        if not (_number(self.auto_tol) and 0 < self.auto_tol < 1):
            raise ValueError(
                f"auto_tol must lie in (0, 1): the relative change of the λ_max estimate at which power iteration "
                f"stops (1e-2: within a few per cent in 6-9 products), got {self.auto_tol!r}."
            )
        if self.upper_data not in UPPER_DATA:
            raise ValueError(f"upper_data must be one of {UPPER_DATA}, got {self.upper_data!r}.")
        if not _int(self.dev_batches) or self.dev_batches < 1:
            raise ValueError(f"dev_batches must be an int >= 1, got {self.dev_batches!r}.")
        if not _int(self.phi_batches) or self.phi_batches < 1:
            raise ValueError(f"phi_batches must be an int >= 1 (training batches uᵀ∂g/∂φ is averaged over; 1: the "
                             f"upper step's train batch alone, the papers'), got {self.phi_batches!r}.")
        if not (_number(self.warm_start) and 0 <= self.warm_start <= 1):
            raise ValueError(f"warm_start must be a number in [0, 1] (the share of the previous upper step's series the next "
                             f"one starts from; 0: from scratch, the papers'), got {self.warm_start!r}.")
        if self.warm_start and self.hypergrad != "neumann":
            raise ValueError(f"warm_start continues the Neumann series from one upper step to the next; it needs "
                             f"hypergrad='neumann', got {self.hypergrad!r}.")
        if self.refit is not None:
            if not _number(self.refit) or not 0 < self.refit < 1:
                raise ValueError(f"refit must be None or a fraction of the run in (0, 1), e.g. 0.67; got {self.refit!r}.")
            if self.upper_data != "dev":
                raise ValueError("refit needs upper_data='dev': with upper_data='train' no D_dev is held out to refit on.")
        if not isinstance(self.dev_in_train, bool):
            raise ValueError(f"dev_in_train must be True (θ also trains on D_dev) or False (D_dev held out of θ's "
                             f"training, the papers' rule), got {self.dev_in_train!r}.")
        if self.dev_in_train:
            if self.upper_data != "dev":
                raise ValueError("dev_in_train needs upper_data='dev': with upper_data='train' no D_dev is held out, "
                                 "θ already trains on all the labelled data.")
            if self.refit is not None:
                raise ValueError("dev_in_train and refit cannot be combined: refit gives D_dev back to θ at the end of "
                                 "the run, dev_in_train gives it from the start; pick one.")
        # canonical numeric types, so that equal configurations compare equal (1 == 1.0 anyway)
        for name in ("upper_lr", "upper_momentum", "upper_weight_decay", "auto_target", "auto_tol", "warm_start"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if _number(self.hyper_lr):
            object.__setattr__(self, "hyper_lr", float(self.hyper_lr))
        if self.clip is not None:
            object.__setattr__(self, "clip", float(self.clip))
        if self.refit is not None:
            object.__setattr__(self, "refit", float(self.refit))

    # -- values ----------------------------------------------------------------------
    def replace(self, **changes: Any) -> "UpperLevel":
        """A copy with `changes` (validated); unknown names are an error that lists the fields."""
        unknown = sorted(set(changes) - set(UPPER_FIELDS))
        if unknown:
            raise TypeError(f"UpperLevel has no field(s) {unknown}; its fields are {list(UPPER_FIELDS)}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (a callable solver or optimiser becomes ``"<callable name>"``)."""
        out: dict[str, Any] = {}
        for name in UPPER_FIELDS:
            value = getattr(self, name)
            if callable(value):
                value = f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UpperLevel":
        """The inverse of `to_dict` (e.g. from a run's ``config["method_config"]["upper"]``).

        Keys that are not fields are an error; a callable recorded as ``"<callable ...>"`` cannot
        be restored and is an error that says so.
        """
        unknown = sorted(set(data) - set(UPPER_FIELDS))
        if unknown:
            raise ValueError(f"not UpperLevel fields: {unknown}; the fields are {list(UPPER_FIELDS)}.")
        for name, value in data.items():
            if isinstance(value, str) and value.startswith("<callable"):
                raise ValueError(f"UpperLevel.from_dict: {name}={value} was a callable and cannot be restored; pass it again.")
        return cls(**dict(data))

    # -- presets -----------------------------------------------------------------------
    @classmethod
    def paper_text(cls, method: str = "maoal", experiment: str | None = None) -> "UpperLevel":
        """The upper level as the paper's text states it (see the book page "The paper and the code").

        Example:
            >>> UpperLevel.paper_text("maoal", "cifar").terms, UpperLevel.paper_text("jtds").hyper_lr
            (2, 1.0)
        """
        return cls._preset(method, "paper_text", experiment)

    @classmethod
    def authors(cls, method: str = "maoal", experiment: str | None = None) -> "UpperLevel":
        """The upper level of the authors' public code (the configuration behind the published tables).

        Example:
            >>> u = UpperLevel.authors("jtds")
            >>> u.hyper_lr, u.leading_eta, u.terms, u.clip
            ('lower', False, 3, 10.0)
        """
        return cls._preset(method, "authors", experiment)

    @classmethod
    def recommended(cls, method: str = "maoal", experiment: str | None = None) -> "UpperLevel":
        """auxnb's recommendation for `method`: what its constructor uses without arguments."""
        from .registry import REGISTRY  # filled by the package (auxnb.methods) once the methods are defined

        cls_ = REGISTRY.get(method)
        if cls_ is None or not hasattr(cls_, "default_upper"):
            bilevel = sorted(n for n, c in REGISTRY.items() if hasattr(c, "default_upper"))
            raise ValueError(f"{method!r} is not a bi-level method; bi-level methods are {bilevel}.")
        return cls_.default_upper

    @classmethod
    def _preset(cls, method: str, kind: str, experiment: str | None) -> "UpperLevel":
        # the tables are registered by auxnb.methods.presets, which the package auxnb.methods imports
        # (importing this module imports the package first)
        table = cls._PRESETS.get(method)
        if table is None or kind not in table:
            known = sorted(m for m, t in cls._PRESETS.items() if kind in t)
            raise ValueError(f"no {kind} preset for method {method!r}; methods with one: {known}.")
        return table[kind](experiment)


#: The field names, in order (also the upper-level keywords every bi-level constructor accepts).
UPPER_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UpperLevel))


def resolve_upper(
    owner: str, default: UpperLevel, upper: UpperLevel | Mapping[str, Any] | None, keywords: Mapping[str, Any]
) -> UpperLevel:
    """The upper level a bi-level constructor ends with: `upper` (or `default`), then `keywords` on top.

    Precedence: an explicit keyword (``upper_lr=0.1``) overrides the same field of ``upper``.
    A keyword that is not an `UpperLevel` field is a ``TypeError`` naming `owner` and the fields.
    """
    unknown = sorted(set(keywords) - set(UPPER_FIELDS))
    if unknown:
        raise TypeError(
            f"{owner}() got unexpected keyword argument(s) {unknown}; the upper-level keywords are "
            f"{list(UPPER_FIELDS)} (or pass upper=UpperLevel(...))."
        )
    if upper is None:
        base = default
    elif isinstance(upper, UpperLevel):
        base = upper
    elif isinstance(upper, Mapping):
        base = UpperLevel.from_dict(upper)
    else:
        raise TypeError(f"{owner}(upper=...) takes an auxnb.methods.UpperLevel or a dict of its fields, got {upper!r}.")
    return base.replace(**keywords) if keywords else base
