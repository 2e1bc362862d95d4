"""The upper-level presets as data: per method, the paper's text and the authors' public code.

Each entry cites where its numbers come from (paper section or file:line of the authors' code,
read to compare, never copied); the book page ``book/paper_vs_code.md`` is the same table in
prose. Nothing here builds a method or touches a model.
"""

from __future__ import annotations

from typing import Any, Callable

from .upper import UpperLevel

__all__ = ["MAOAL_EXPERIMENTS", "AUTHORS_CODE", "FORKMERGE_AUTHORS", "preset_table"]

#: MAOAL supplement §2 per experiment: T, and φ's optimiser (the paper's text and, for the rating
#: data, the authors' code agree on these: train_regularizer.py:233, params_reg.json "interval": 20).
MAOAL_EXPERIMENTS: dict[str, dict[str, Any]] = {
    "cub": {"lower_steps": 5, "upper_optimizer": "adam", "upper_lr": 1e-2},
    "cub-semi": {"lower_steps": 3, "upper_optimizer": "adam", "upper_lr": 1e-2},
    "pet": {"lower_steps": 50, "upper_optimizer": "adam", "upper_lr": 1e-2},
    "pet-semi": {"lower_steps": 50, "upper_optimizer": "adam", "upper_lr": 1e-2},
    "cifar": {"lower_steps": 20, "upper_optimizer": "adam", "upper_lr": 1e-2},
    "beauty": {"lower_steps": 20, "upper_optimizer": "sgd", "upper_lr": 0.1, "upper_momentum": 0.0},
    "movielens": {"lower_steps": 20, "upper_optimizer": "sgd", "upper_lr": 1e-3, "upper_momentum": 0.9},
}

#: Where each authors' preset comes from (repository @ commit read, file:line).
AUTHORS_CODE: dict[str, str] = {
    "maoal": "forchchch/MAOAL@497ea64 train_regularizer.py:233-234 (SGD momentum 0.9 on α; MetaOptimizer(hpo_lr=1.0, "
             "truncate_iter=3, max_grad_norm=10)), gauxlearn/implicit_diff.py:49-65 (p = Σ_{i=0..3}(I − ηJ)^i v, "
             "no leading η), config/params_reg.json (interval 20, hyper lr 1e-3, decay 0)",
    "jtds": "forchchch/JTDS@75f7612 train_bilevel.py:447-452 (SGD momentum 0.9, weight decay auxw_decay; "
            "MetaOptimizer(hpo_lr=main_lr, truncate_iter=3, max_grad_norm=10)), run_bilevel.sh:2 (hyperstep 20, "
            "aux_lr 1e-2, main_lr 1e-4, auxw_decay 5e-5), auxilearn/implicit_diff.py:69-86 (no leading η)",
    "n-jtds": "forchchch/JTDS@75f7612 run_NJTDS.py:287-293 (as JTDS), run_naive.sh (hyperstep 20, aux_lr 1e-2, "
              "auxw_decay 5e-3)",
    "auxl": "AvivNavon/AuxiLearn@17495d6 experiments/oxford_pet/trainer.py:41-45,177-182 (auxgrad-every 30, SGD "
            "1e-3 momentum 0.9 weight decay 5e-3, MetaOptimizer(hpo_lr=lr, truncate_iter=3, max_grad_norm=50)), "
            "auxilearn/implicit_diff.py:58-75 (no leading η)",
}


#: ForkMerge's authors' code per experiment (`ForkMerge.authors`; not an `UpperLevel`: ForkMerge has no φ
#: optimiser): Δt in epochs (``--epoch_step``), the run's epochs, the merge grid (``--alphas``) and what the
#: merge weights are chosen on (the validation metric). Where from: `AUTHORS_CODE["forkmerge"]`.
FORKMERGE_AUTHORS: dict[str, dict[str, Any]] = {
    "domainnet": {"interval_epochs": 5, "epochs": 20, "alphas": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "criterion": "metric",
                  "topk": (0, 3, 5), "pruning_epochs": 1},
    "nyuv2": {"interval_epochs": 30, "epochs": 200, "alphas": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "criterion": "metric",
              "topk": (0, 1, 2), "pruning_epochs": 10},
}
AUTHORS_CODE["forkmerge"] = (
    "thuml/ForkMerge, branch develop (read to compare, never copied): auxiliary_domain_image_recognition/forkmerge.py@37fd2ef "
    "(argparse defaults --epoch_step 5, --epochs 20, --alphas 0 0.2 0.4 0.6 0.8 1.0, --topk 0 3 5, --pruning_epochs 1; "
    "the merge loop after print('merging'): greedy on the mean validation accuracy), "
    "auxiliary_task_scene_understanding/forkmerge.sh@fa0ffd0 (--epoch_step 30) and forkmerge.py (--n_epochs 200, "
    "the same --alphas, --topk 0 1 2, --pruning_epochs 10; greedy on the Δm improvement over single-task results)"
)


def _maoal_experiment(experiment: str | None) -> dict[str, Any]:
    experiment = experiment or "cifar"
    if experiment not in MAOAL_EXPERIMENTS:
        raise ValueError(f"Unknown MAOAL experiment {experiment!r}; the paper's are {', '.join(MAOAL_EXPERIMENTS)}.")
    return dict(MAOAL_EXPERIMENTS[experiment])


def _maoal_paper_text(experiment: str | None) -> UpperLevel:
    # supplement Eq. A3 sums τ = 0..M−1 with M = 3: 2 matvecs; η = η₁ (the lower lr) leads the sum;
    # the paper states no clipping
    return UpperLevel(terms=2, hyper_lr="lower", leading_eta=True, clip=None, upper_data="dev",
                      **_maoal_experiment(experiment))


def _maoal_authors(experiment: str | None) -> UpperLevel:
    # the released code (rating data) runs Hypergrad(learning_rate=1.0, truncate_iter=3): the series
    # Σ_{i=0..3} (I − J)^i, 3 matvecs (Algorithm 1, lines 18-21), no leading η, clipping at 10. The
    # image experiments' code is not public: the same module is assumed, with the supplement's T and φ optimiser.
    return UpperLevel(terms=3, hyper_lr=1.0, leading_eta=False, clip=10.0, upper_data="dev",
                      **_maoal_experiment(experiment))


_JTDS_TEXT = {"lower_steps": 20, "terms": 3, "upper_optimizer": "sgd", "upper_lr": 1e-2, "upper_momentum": 0.9}


def _jtds_paper_text(experiment: str | None) -> UpperLevel:
    # JTDS Eq. 8-9: Σ_{i=0..K} (I − ∇²L_t)^i, i.e. η = 1; A.4: SGD with lr from {1e-2, 1e-3}, M from
    # {10, 20, 50}, K from {3, 5}; momentum and clipping are not stated (momentum 0.9: SPEC-NOTES)
    return UpperLevel(hyper_lr=1.0, leading_eta=True, clip=None, **_JTDS_TEXT)


def _jtds_authors(experiment: str | None) -> UpperLevel:
    return UpperLevel(hyper_lr="lower", leading_eta=False, clip=10.0, upper_weight_decay=5e-5, **_JTDS_TEXT)


def _njtds_authors(experiment: str | None) -> UpperLevel:
    return UpperLevel(hyper_lr="lower", leading_eta=False, clip=10.0, upper_weight_decay=5e-3, **_JTDS_TEXT)


def _auxl_paper_text(experiment: str | None) -> UpperLevel:
    # AuxL as the baseline of MAOAL's tables, at that experiment's cadence and φ optimiser, with
    # the series as MAOAL's text writes it (K = 3, η = lower lr leading); Navon et al.'s paper is not in papers/
    return UpperLevel(terms=3, hyper_lr="lower", leading_eta=True, clip=None, upper_data="dev",
                      **_maoal_experiment(experiment))


def _auxl_authors(experiment: str | None) -> UpperLevel:
    if experiment is None:  # AuxiLearn's own Oxford-Pet script
        return UpperLevel(lower_steps=30, terms=3, hyper_lr="lower", leading_eta=False, clip=50.0, upper_optimizer="sgd",
                          upper_lr=1e-3, upper_momentum=0.9, upper_weight_decay=5e-3, upper_data="dev")
    # as a baseline of MAOAL's tables: the experiment's cadence and φ optimiser, the auxilearn series
    # (η = lower lr, no leading η, 3 matvecs) with the clipping of the authors' copies of it (10)
    return UpperLevel(terms=3, hyper_lr="lower", leading_eta=False, clip=10.0, upper_data="dev",
                      **_maoal_experiment(experiment))


def _dtg_paper_text(experiment: str | None) -> UpperLevel:
    # DTG Eq. 13 as printed (η = 1, K = 3), the upper objective on the primary training data (appendix)
    return UpperLevel(lower_steps=5, terms=3, hyper_lr=1.0, leading_eta=True, upper_data="train")


_TABLE: dict[str, dict[str, Callable[[str | None], UpperLevel]]] = {
    "maoal": {"paper_text": _maoal_paper_text, "authors": _maoal_authors},
    "jtds": {"paper_text": _jtds_paper_text, "authors": _jtds_authors},
    "n-jtds": {"paper_text": _jtds_paper_text, "authors": _njtds_authors},
    "auxl": {"paper_text": _auxl_paper_text, "authors": _auxl_authors},
    # DTG has no public code: only its paper text
    "dtg": {"paper_text": _dtg_paper_text},
}
UpperLevel._PRESETS.update(_TABLE)


def preset_table() -> list[dict[str, Any]]:
    """Every preset as rows (method, experiment, kind, then the fields): for printing and comparing."""
    rows = []
    for method, kinds in _TABLE.items():
        experiments = list(MAOAL_EXPERIMENTS) if method in ("maoal", "auxl") else [None]
        for experiment in experiments:
            for kind, build in kinds.items():
                rows.append({"method": method, "experiment": experiment, "kind": kind, **build(experiment).to_dict()})
    return rows
