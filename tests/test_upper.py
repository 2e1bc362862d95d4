"""Tests for `auxnb.methods.UpperLevel`: one frozen value for the upper level of every bi-level method.

Checked against independent truth: a config written to JSON and read back gives an equal value;
the old keyword calls and ``upper=`` give the same φ trajectory, bit for bit; the authors' code's
series (no leading η) moves φ by exactly 1/η times the paper's for one SGD step, checked against
`implicit_grad` called by hand; the presets carry the values read in the authors' code.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from auxnb import experiments
from auxnb.methods import DTG, JTDS, MAOAL, MAXL, NJTDS, AutoFMix, AutoLambda, AutoMix, AuxiNash, AuxL, UpperLevel, get
from auxnb.methods.bilevel import BilevelMethod
from auxnb.methods.presets import preset_table
from auxnb.methods.upper import UPPER_FIELDS
from test_bilevel import DT, LearnedAuxWeights, _manual_hypergrad, _one_upper_step, run

BILEVEL = (AuxL, MAOAL, JTDS, NJTDS, DTG, AutoMix, AutoFMix, MAXL, AutoLambda, AuxiNash)


def test_every_registered_bilevel_method_takes_upper_and_stores_it_in_a_json_config_that_reads_back_equal():
    from auxnb.methods import _REGISTRY

    bilevel = {name for name, cls in _REGISTRY.items() if issubclass(cls, BilevelMethod)}
    assert bilevel == {c.name for c in BILEVEL}  # the list above is every bi-level method
    custom = UpperLevel(lower_steps=7, terms=1, hyper_lr=0.3, leading_eta=False, upper_optimizer="sgd", upper_lr=0.05,
                        upper_momentum=0.5, upper_weight_decay=1e-4, clip=None, check_every=2, upper_data="dev",
                        dev_batches=2, refit=0.5)
    for cls in BILEVEL:
        for method in (cls(), cls(upper=custom)):
            config = json.loads(json.dumps(method.config()))  # JSON-serialisable, as a run's config is
            assert UpperLevel.from_dict(config["upper"]) == method.upper, cls.__name__
            assert {k: config[k] for k in UPPER_FIELDS if k != "lower_steps"} == {
                k: v for k, v in config["upper"].items() if k != "lower_steps"
            }  # the flat keys of earlier configs agree with the nested value
        assert cls(upper=custom).upper == custom
        assert cls(upper=custom.to_dict()).upper == custom  # a dict of fields works too
        assert repr(custom) in repr(cls(upper=custom))


def test_old_keywords_and_upper_build_the_same_value_and_keywords_override_upper_fields():
    kw = dict(lower_steps=4, hyper_lr=0.2, upper_optimizer="sgd", upper_lr=0.3, upper_momentum=0.0, clip=None)
    for cls in BILEVEL:
        assert cls(**kw).upper == cls(upper=cls.default_upper.replace(**kw)).upper, cls.__name__
    base = UpperLevel.authors("maoal", "cifar")
    m = MAOAL(upper=base, upper_lr=0.5, clip=None)  # documented precedence: the keyword wins
    assert m.upper == base.replace(upper_lr=0.5, clip=None) and m.terms == base.terms
    assert MAOAL(lookback=3).terms == 2 and MAOAL(lookback=2, terms=1).terms == 1
    with pytest.raises(ValueError, match="lookback=3 means terms=2"):
        MAOAL(lookback=3, terms=3)
    # fields stay readable and settable as attributes; setting replaces the frozen value
    m.upper_lr = 0.25
    assert m.upper.upper_lr == 0.25 and m.upper == base.replace(upper_lr=0.25, clip=None)
    with pytest.raises(ValueError, match="clip"):
        m.clip = -1.0
    m.upper_data = "train"
    assert m.uses_dev is False
    # registry calls and experiment method_kwargs go through the same path
    assert get("jtds", upper_lr=0.2).upper == JTDS.default_upper.replace(upper_lr=0.2)


def test_old_keywords_and_upper_give_a_bit_identical_phi_trajectory():
    kw = dict(lower_steps=3, terms=2, hyper_lr="lower", upper_optimizer="adam", upper_lr=0.05, clip=1.0)
    a = LearnedAuxWeights(init=0.5, **kw)
    b = LearnedAuxWeights(init=0.5, upper=UpperLevel(**kw))
    run(a, steps=9)
    run(b, steps=9)
    assert a._upper_steps == b._upper_steps == 3
    assert torch.equal(a.rho.detach(), b.rho.detach()) and not torch.equal(a.rho.detach(), torch.full((2,), 0.5, dtype=DT))


@pytest.mark.parametrize("hyper_lr", [0.2, "lower"])
def test_leading_eta_false_is_the_authors_series_one_over_eta_times_the_papers(hyper_lr):
    """One SGD step (momentum 0, no clipping) with ``leading_eta=False`` moves φ by −lr·h/η where
    h is `implicit_grad` computed by hand (−η·vᵀΣ(I − ηJ)^i ∂g/∂φ): the authors' code's −vᵀΣ(I − ηJ)^i ∂g/∂φ."""
    T, K, upper_lr, init = 4, 3, 0.3, 0.5
    method = LearnedAuxWeights(init=init, lower_steps=T, terms=K, hyper_lr=hyper_lr, leading_eta=False,
                               upper_optimizer="sgd", upper_lr=upper_lr, upper_momentum=0.0, clip=None)
    data, rec, info = _one_upper_step(method, T)
    eta = 0.05 if hyper_lr == "lower" else hyper_lr
    rho0 = torch.full((2,), init, dtype=DT)
    hg, _ = _manual_hypergrad(data, rec.snapshot, rho0, method.upper_train_ids[0], method.dev_ids[0],
                              terms=K, eta=eta, nonneg="softplus")
    assert float(hg.norm()) > 1e-6
    torch.testing.assert_close(method.rho.detach(), rho0 - upper_lr * hg / eta, rtol=1e-11, atol=1e-14)
    assert info["hypergrad_norm"] == pytest.approx(float(hg.norm()) / eta, rel=1e-12)


def test_upper_weight_decay_reaches_the_phi_optimiser():
    opt = LearnedAuxWeights(upper_optimizer="sgd", upper_weight_decay=5e-5)
    run(opt, steps=20)
    assert opt.upper_opt.param_groups[0]["weight_decay"] == 5e-5
    adam = LearnedAuxWeights(upper_optimizer="adam", upper_weight_decay=1e-3)
    run(adam, steps=20)
    assert adam.upper_opt.param_groups[0]["weight_decay"] == 1e-3


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lower_steps", 0, "lower_steps must be an integer >= 1"),
        ("lower_steps", 2.5, "lower_steps must be an integer"),
        ("terms", -1, "terms must be an integer >= 0"),
        ("hyper_lr", 0.0, "hyper_lr must be a positive number, 'lower' or 'auto'"),
        ("hyper_lr", "paper", "hyper_lr must be"),
        ("leading_eta", "no", "leading_eta must be True"),
        ("hypergrad", "newton", "Unknown hypergrad 'newton'"),
        ("upper_optimizer", "rmsprop", "Unknown upper_optimizer 'rmsprop'"),
        ("upper_lr", -1e-3, "upper_lr must be a finite number >= 0"),
        ("upper_momentum", float("nan"), "upper_momentum must be a finite number"),
        ("upper_weight_decay", -1.0, "upper_weight_decay must be"),
        ("clip", 0.0, "clip must be > 0 or None"),
        ("clip_mode", "min", r"clip_mode must be one of \('max', 'fixed'\)"),
        ("check_every", -1, "check_every must be an integer >= 0"),
        ("auto_every", 0, "auto_every must be an int >= 1"),
        ("auto_target", 2.0, r"auto_target must lie in \(0, 2\)"),
        ("auto_tol", 0.0, r"auto_tol must lie in \(0, 1\)"),
        ("auto_tol", 1.0, r"auto_tol must lie in \(0, 1\)"),
        ("upper_data", "test", "upper_data must be one of"),
        ("dev_batches", 0, "dev_batches must be an int >= 1"),
        ("phi_batches", 0, "phi_batches must be an int >= 1"),
        ("phi_batches", 2.0, "phi_batches must be an int >= 1"),
        ("phi_batches", True, "phi_batches must be an int >= 1"),
        ("warm_start", -0.1, r"warm_start must be a number in \[0, 1\]"),
        ("warm_start", 1.5, r"warm_start must be a number in \[0, 1\]"),
        ("refit", 1.0, r"refit must be None or a fraction of the run in \(0, 1\)"),
    ],
)
def test_each_bad_field_is_a_clear_error_from_the_dataclass_and_from_every_constructor(field, value, message):
    with pytest.raises(ValueError, match=message):
        UpperLevel(**{field: value})
    for cls in (MAOAL, JTDS, DTG):
        with pytest.raises(ValueError, match=message):
            cls(**{field: value})


@pytest.mark.parametrize("clip_mode", ["max", "fixed"])
def test_clip_none_leaves_the_hypergradient_as_it_is_in_either_clip_mode(clip_mode):
    # `JTDS(clip=None)` (the default clip_mode is "fixed" there) keeps its meaning from before clip_mode:
    # one SGD step moves φ by −lr·h/η, h the implicit gradient computed by hand
    T, K, upper_lr, init, eta = 4, 3, 0.3, 0.5, 0.2
    method = LearnedAuxWeights(init=init, lower_steps=T, terms=K, hyper_lr=eta, leading_eta=False, upper_optimizer="sgd",
                               upper_lr=upper_lr, upper_momentum=0.0, clip=None, clip_mode=clip_mode)
    data, rec, _ = _one_upper_step(method, T)
    rho0 = torch.full((2,), init, dtype=DT)
    hg, _ = _manual_hypergrad(data, rec.snapshot, rho0, method.upper_train_ids[0], method.dev_ids[0],
                              terms=K, eta=eta, nonneg="softplus")
    assert abs(float(hg.norm()) / eta - 1.0) > 1e-3  # a norm other than 1: scaling would show
    torch.testing.assert_close(method.rho.detach(), rho0 - upper_lr * hg / eta, rtol=1e-11, atol=1e-14)
    assert JTDS(clip=None).upper.clip is None and JTDS().upper.clip_mode == "fixed"


def test_wrong_keywords_and_wrong_upper_types_are_clear_errors():
    with pytest.raises(ValueError, match="refit needs upper_data='dev'"):
        UpperLevel(refit=0.5, upper_data="train")
    with pytest.raises(TypeError, match=r"MAOAL\(\) got unexpected keyword argument\(s\) \['upper_lrr'\].*upper_lr"):
        MAOAL(upper_lrr=0.1)
    with pytest.raises(TypeError, match="takes an auxnb.methods.UpperLevel"):
        JTDS(upper=3)
    with pytest.raises(TypeError, match="no field"):
        UpperLevel().replace(eta=1.0)
    with pytest.raises(ValueError, match="not UpperLevel fields"):
        UpperLevel.from_dict({"lower_steps": 3, "speed": 1})
    with pytest.raises(ValueError, match="cannot be restored"):
        UpperLevel.from_dict(UpperLevel(hypergrad=lambda matvec, b: b).to_dict())
    with pytest.raises(Exception):  # frozen
        UpperLevel().terms = 5  # type: ignore[misc]


def test_presets_hold_the_values_read_in_the_papers_and_the_authors_code():
    # MAOAL: Eq. A3 (M = 3 -> 2 matvecs, η = η₁ leading, no clipping) vs the code (η = 1, 3 matvecs, clip 10)
    text, code = UpperLevel.paper_text("maoal", "movielens"), UpperLevel.authors("maoal", "movielens")
    assert (text.terms, text.hyper_lr, text.leading_eta, text.clip) == (2, "lower", True, None)
    assert (code.terms, code.hyper_lr, code.leading_eta, code.clip) == (3, 1.0, False, 10.0)
    for u in (text, code):  # supplement §2.4 and train_regularizer.py:233 agree on these
        assert (u.lower_steps, u.upper_optimizer, u.upper_lr, u.upper_momentum) == (20, "sgd", 1e-3, 0.9)
    # JTDS: Eq. 8-9 (η = 1) vs the code (η = lower lr, no leading η, clip 10, weight decay 5e-5)
    text, code = UpperLevel.paper_text("jtds"), UpperLevel.authors("jtds")
    assert (text.hyper_lr, text.clip) == (1.0, None)
    assert (code.hyper_lr, code.leading_eta, code.clip, code.upper_weight_decay) == ("lower", False, 10.0, 5e-5)
    assert UpperLevel.authors("auxl").clip == 50.0 and UpperLevel.authors("auxl").lower_steps == 30
    # the `.paper()` constructors are the authors' configuration, `.paper_text()` the text
    assert MAOAL.paper("cub").upper == UpperLevel.authors("maoal", "cub") and MAOAL.paper("cub").nonneg == "relu"
    assert MAOAL.paper_text("cub").upper == UpperLevel.paper_text("maoal", "cub")
    assert JTDS.paper().upper == UpperLevel.authors("jtds") and JTDS.paper_text().upper == UpperLevel.paper_text("jtds")
    assert NJTDS.paper().upper == UpperLevel.authors("n-jtds")
    assert UpperLevel.recommended("maoal") == MAOAL().upper
    with pytest.raises(ValueError, match="no authors preset for method 'dtg'"):
        UpperLevel.authors("dtg")
    with pytest.raises(ValueError, match="not a bi-level method"):
        UpperLevel.recommended("gcs")
    rows = preset_table()
    assert {r["method"] for r in rows} == {"maoal", "jtds", "n-jtds", "auxl", "dtg"}
    assert all(UpperLevel.from_dict({k: r[k] for k in UPPER_FIELDS}) for r in rows)


@pytest.mark.parametrize(
    "setting, experiment", [("cifar10-rotation", "cifar"), ("cub-attributes", "cub"), ("pet-rotation", "pet"),
                            ("movielens-l2", "movielens"), ("beauty-l2", "beauty"), ("digits-rotation", "cifar")],
)
def test_paper_scale_of_the_settings_uses_the_authors_configuration(setting, experiment):
    defaults = experiments.get_setting(setting).method_defaults
    assert defaults["maoal"]["paper"]["upper"] == UpperLevel.authors("maoal", experiment)
    assert defaults["jtds"]["paper"]["upper"] == UpperLevel.authors("jtds")
    assert defaults["n-jtds"]["paper"]["upper"] == UpperLevel.authors("n-jtds")
    assert defaults["auxl"]["paper"]["upper"] == UpperLevel.authors("auxl", experiment)
    # small and smoke keep the constructors' recommendation (smoke only shortens the cadence)
    assert "upper" not in defaults["maoal"].get("small", {}) and "upper" not in defaults["maoal"].get("smoke", {})


def test_rating_l2_task_is_the_authors_coefficient_times_the_squared_norm_at_paper_scale():
    from auxnb.experiments.core import resolve_config
    from auxnb.methods.base import compute_terms

    setting = experiments.get_setting("movielens-l2")
    assert resolve_config(setting, "paper", {})["l2_coefficient"] == 1e-3  # config/params_reg.json "aux_weight"
    config = resolve_config(setting, "smoke", {"l2_coefficient": 1e-3})
    bundle, model = setting.build({**config, "seed": 0, "data_root": None})
    batch = bundle.train.gather(torch.arange(8))
    terms = compute_terms(model, {"primary": batch}, bundle.tasks, names=["rating", "l2"])
    squared = sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    assert float(terms.mean("l2").detach()) == pytest.approx(1e-3 * squared, rel=1e-5)
    with pytest.raises(ValueError, match="l2_coefficient must be > 0"):
        setting.build({**resolve_config(setting, "smoke", {"l2_coefficient": -1.0}), "seed": 0, "data_root": None})


@pytest.mark.parametrize("leading_eta", [True, False])
def test_upper_step_at_a_zero_lower_learning_rate_leaves_phi_alone_instead_of_failing(leading_eta):
    # cosine annealing reaches lr = 0 at the last lower step; with hyper_lr="lower" the series' η is 0
    # (the paper's leading η makes the hypergradient exactly 0; the authors' 1/η is undefined)
    method = LearnedAuxWeights(init=0.5, lower_steps=4, hyper_lr="lower", leading_eta=leading_eta,
                               upper_optimizer="sgd", upper_momentum=0.9)
    result, _, _ = run(method, steps=8, scheduler="cosine")
    assert method._upper_steps == 2
    assert method.last_upper["hyper_lr"] == 0.0 and method.last_upper["hypergrad_norm"] == 0.0
    assert math.isfinite(result.test_metric)


def test_phi_moves_under_the_authors_preset_and_barely_under_the_paper_text_on_digits():
    """MAOAL, a strong L2 auxiliary loss, the rating presets (SGD 1e-3 on α), digits at smoke scale
    (Adam 1e-3 below, so η = 1e-3): the paper text's −η·Σ… moves α by < 1e-5 in six upper steps,
    the authors' series (η = 1, no leading η, clip 10) by > 1e-2 (benchmarks/phi_motion.py at full length)."""
    from auxnb.methods import l2_penalty

    moved = {}
    for name, ctor in (("text", MAOAL.paper_text), ("authors", MAOAL.paper)):
        method = ctor("movielens", aux_tasks=[], aux_losses={"l2": l2_penalty(scale=1e-2)}, lower_steps=5)
        result = experiments.run("digits-rotation", method, scale="smoke", progress=False, device="cpu", seed=0,
                                 guard=None)  # the method alone (run guards MAOAL by default, issue 23)
        assert method._upper_steps == 6
        moved[name] = max(abs(v - 1.0) for v in result.trace[-1]["importance"][0])
    assert moved["text"] < 1e-5 and moved["authors"] > 1e-2


@pytest.mark.parametrize("hypergrad", ["exact", "cg"])
def test_warm_start_needs_the_neumann_series(hypergrad):
    with pytest.raises(ValueError, match="warm_start continues the Neumann series"):
        UpperLevel(hypergrad=hypergrad, warm_start=0.5)
    assert UpperLevel(hypergrad=hypergrad, warm_start=0).warm_start == 0.0
