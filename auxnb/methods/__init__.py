"""Methods: one class per method behind one protocol (`Method`), and a string registry.

The Trainer never branches on the method; adding a method means adding a class here.
"""

from __future__ import annotations


from .base import Batch, LossTerms, Method, SetupInfo, compute_terms
from .fixed import Equal, FixedWeights
from .gcs import GCS
from .hpo import HPOTune
from .registry import REGISTRY, get, names, register
from .stl import STL
from .uncert import Uncert
from .upper import UpperLevel

__all__ = [
    "Method", "LossTerms", "SetupInfo", "Batch", "compute_terms",
    "STL", "Equal", "FixedWeights", "HPOTune", "Uncert", "GCS",
    "get", "names", "register", "UpperLevel",
]

_REGISTRY = REGISTRY  # the registry (auxnb.methods.registry); this name kept for old imports


for _cls in (STL, Equal, FixedWeights, HPOTune, Uncert, GCS):
    register(_cls)

# --- bi-level methods (issue 3 base; MAOAL/AuxL issue 4) ---
from .auxl import AuxL  # noqa: E402
from .maoal import MAOAL, l2_penalty  # noqa: E402

for _cls in (AuxL, MAOAL):
    register(_cls)
__all__ += ["AuxL", "MAOAL", "l2_penalty"]

# --- JTDS / N-JTDS (issue 5) ---
from .jtds import JTDS  # noqa: E402
from .njtds import NJTDS  # noqa: E402

register(JTDS)
register(NJTDS)
__all__ += ["JTDS", "NJTDS"]

# --- DTG, MixUp family, MAXL (issue 6) ---
from .dtg import DTG  # noqa: E402
from .maxl import MAXL  # noqa: E402
from .mixup import AutoFMix, AutoMix, FMixUp, MixUp  # noqa: E402

for _cls in (DTG, MixUp, FMixUp, AutoMix, AutoFMix, MAXL):
    register(_cls)
__all__ += ["DTG", "MixUp", "FMixUp", "AutoMix", "AutoFMix", "MAXL"]

# --- the upper-level presets (the papers' text, the authors' code) register on UpperLevel ---
from . import presets  # noqa: E402,F401

# --- the old spelling of the do-no-harm guard (issue 13; the guard is auxnb.selection's now) ---
from .guard import without_guard  # noqa: E402

__all__ += ["without_guard"]

# --- after the three papers (issue 24): TorchJD's aggregators behind one adapter ---
from .aggregated import Aggregated  # noqa: E402

register(Aggregated)
__all__ += ["Aggregated"]

# --- Auto-Lambda (issue 24) ---
from .autolambda import AutoLambda  # noqa: E402

register(AutoLambda)
__all__ += ["AutoLambda"]

# --- AuxiNash (issue 24) ---
from .auxinash import AuxiNash  # noqa: E402

register(AuxiNash)
__all__ += ["AuxiNash"]

# --- ForkMerge (issue 24) ---
from .forkmerge import ForkMerge  # noqa: E402

register(ForkMerge)
__all__ += ["ForkMerge"]
