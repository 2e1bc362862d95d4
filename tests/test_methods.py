"""Single-level methods against hand computation: GCS weights, Uncert's formula, fixed weights, registry errors."""

import math

import pytest
import torch
from torch import nn

from auxnb import methods
from auxnb.methods import GCS, SetupInfo, Uncert
from auxnb.methods.base import LossTerms
from auxnb.tasks import Task, TaskSet


class TwoParam(nn.Module):
    """A shared backbone parameter w and one head parameter per task (Du et al.'s split)."""

    def __init__(self, tasks=("main", "a1", "a2")):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.w = nn.Parameter(torch.tensor([1.0, 1.0]))
        self.heads = nn.ParameterDict({t: nn.Parameter(torch.tensor([0.5, -1.0])) for t in tasks})


def _terms(tasks, losses):
    return LossTerms(
        tasks=tasks,
        losses={k: v.reshape(1) for k, v in losses.items()},
        masks={k: torch.ones(1, dtype=torch.bool) for k in losses},
        outputs={}, features={}, targets={},
    )


def _info(tasks):
    return SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=1, seed=0)


@pytest.mark.parametrize("weighted", [True, False])
def test_gcs_direction_equals_hand_computed_clipped_cosine_gating_only_the_shared_parameters(weighted):
    tasks = TaskSet([Task("main", "regression", primary=True), Task("a1", "regression"), Task("a2", "regression")])
    model = TwoParam()
    w, h = model.backbone.w, model.heads
    gcs = GCS(weighted=weighted)
    gcs.setup(model, _info(tasks))
    # each loss = a backbone part + a part on its own head h_k = (0.5, -1)
    losses = {
        "main": (w[0] - 2) ** 2 + w[1] ** 2 + (h["main"] ** 2).sum(),  # ∇w (-2, 2); ∇h_main (1, -2)
        "a1": 3 * w[0] + w[1] + 2 * h["a1"][0] - h["a1"][1],  # ∇w (3, 1): cos = -4/sqrt(80) < 0; ∇h_a1 (2, -1)
        "a2": -w[0] + 2 * w[1] + h["a2"][1] ** 2,  # ∇w (-1, 2): cos = 6/sqrt(40); ∇h_a2 (0, -2)
    }
    params = [w, h["main"], h["a1"], h["a2"]]
    d_w, d_main, d_a1, d_a2 = gcs.direction(_terms(tasks, losses), params)
    c2 = 6 / math.sqrt(40)
    w2 = c2 if weighted else 1.0
    # the shared parameters: ∇L_main + Σ_k w_k ∇L_k with w_a1 = 0
    assert torch.allclose(d_w, torch.tensor([-2.0, 2.0]) + w2 * torch.tensor([-1.0, 2.0]), atol=1e-6)
    # each head: its own task's gradient, ungated (Du et al. gate the shared update only), so the
    # head of a1 keeps learning a1 although a1's gradient conflicts with the primary one
    assert torch.allclose(d_main, torch.tensor([1.0, -2.0]))
    assert torch.allclose(d_a1, torch.tensor([2.0, -1.0]))
    assert torch.allclose(d_a2, torch.tensor([0.0, -2.0]))
    assert gcs.trace()["weight/a1"] == 0.0
    assert gcs.trace()["weight/a2"] == pytest.approx(w2, rel=1e-6)


def test_gcs_without_shared_parameters_is_a_clear_error():
    tasks = TaskSet([Task("main", "regression", primary=True)])
    with pytest.raises(ValueError, match="no shared parameters"):
        GCS().setup(nn.Linear(1, 1), _info(tasks))


@pytest.mark.parametrize("kind,scale", [("classification", 1.0), ("regression", 0.5)])
def test_uncert_matches_kendall_formula(kind, scale):
    # Kendall et al. 2018: classification L/σ² + log σ; regression L/(2σ²) + log σ; here σ = 2, L = 3.
    tasks = TaskSet([Task("main", kind, 3 if kind == "classification" else 1, primary=True)])
    u = Uncert()
    u.setup(nn.Linear(1, 1), _info(tasks))
    with torch.no_grad():
        u.log_var.fill_(math.log(4.0))
    value = u.objective(_terms(tasks, {"main": torch.tensor(3.0)}))
    expected = scale * 3.0 / 4.0 + math.log(2.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_uncert_log_variance_gradient_matches_derivative():
    # d/ds [exp(-s) L + s/2] = -exp(-s) L + 1/2
    tasks = TaskSet([Task("main", "classification", 3, primary=True)])
    u = Uncert(init=0.3)
    u.setup(nn.Linear(1, 1), _info(tasks))
    (g,) = torch.autograd.grad(u.objective(_terms(tasks, {"main": torch.tensor(2.0)})), [u.log_var])
    assert g.item() == pytest.approx(-math.exp(-0.3) * 2.0 + 0.5, rel=1e-6)


def test_fixed_weights_direction_is_weighted_gradient():
    tasks = TaskSet([Task("main", "regression", primary=True), Task("aux", "regression")])
    model = TwoParam()
    w = model.backbone.w
    m = methods.get("fixed", weights={"aux": 0.25})
    m.setup(model, _info(tasks))
    (d,) = m.direction(_terms(tasks, {"main": (w ** 2).sum(), "aux": (3 * w).sum()}), [w])
    assert torch.allclose(d, 2 * w.detach() + 0.25 * 3)


def test_fixed_weights_reject_negative_and_unknown():
    with pytest.raises(ValueError, match=">= 0"):
        methods.get("fixed", weights={"aux": -1.0})
    tasks = TaskSet([Task("main", "regression", primary=True)])
    with pytest.raises(ValueError, match="unknown tasks"):
        methods.get("fixed", weights={"nope": 1.0}).setup(TwoParam(), _info(tasks))


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="valid methods: .*stl.*gcs"):
        methods.get("nope")


def test_hpo_candidates_are_reproducible_and_start_with_equal():
    h = methods.get("hpo-tune", trials=5, seed=3)
    a, b = h.candidates(["x", "y"]), h.candidates(["x", "y"])
    assert a == b and a[0] == {"x": 1.0, "y": 1.0} and len(a) == 5
    assert all(0.0 <= v <= 10.0 for c in a for v in c.values())


def test_gcs_group_aux_gates_the_sum_of_the_auxiliary_losses_with_one_cosine():
    tasks = TaskSet([Task("main", "regression", primary=True), Task("a1", "regression"), Task("a2", "regression")])
    model = TwoParam()
    w = model.backbone.w
    gcs = GCS(group_aux=True)
    gcs.setup(model, _info(tasks))
    losses = {"main": (w[0] - 2) ** 2 + w[1] ** 2, "a1": 3 * w[0] + w[1], "a2": -w[0] + 2 * w[1]}
    (d_w,) = gcs.direction(_terms(tasks, losses), [w])
    # the auxiliary losses as one: ∇ = (3, 1) + (-1, 2) = (2, 3); cos with (-2, 2) = 2 / (sqrt(8)·sqrt(13))
    c = 2 / (math.sqrt(8) * math.sqrt(13))
    assert torch.allclose(d_w, torch.tensor([-2.0, 2.0]) + c * torch.tensor([2.0, 3.0]), atol=1e-6)
    assert gcs.trace() == {"weight/auxiliary": pytest.approx(c, rel=1e-6)}


def test_hpo_tune_group_aux_searches_one_weight_shared_by_every_auxiliary_task():
    names = [f"attr{i}" for i in range(312)]
    grouped = methods.get("hpo-tune", trials=6, seed=1, group_aux=True).candidates(names)
    assert len(grouped) == 6 and all(len(set(c.values())) == 1 for c in grouped)
    assert len({c["attr0"] for c in grouped}) > 2  # the one dimension is searched
    # without grouping the draws are as before (one weight per task)
    assert len(set(methods.get("hpo-tune", trials=2, seed=1).candidates(names)[1].values())) > 1
