"""The TorchJD aggregator adapter against hand computation: PCGrad's projection, MGDA's and UPGrad's closed
forms for orthogonal gradients, the primary-priority modes, unlabelled tasks, RNG isolation, Nash-MTL's
resumable state, and the install hint when TorchJD is absent."""

import importlib.util

import pytest
import torch
from torch import nn

from auxnb import methods
from auxnb.methods.base import LossTerms, SetupInfo
from auxnb.tasks import Task, TaskSet

NAMES = ("main", "a1", "a2")


class Linear(nn.Module):
    """L_k = g_k · w + ½‖h_k‖²: the backbone gradient of task k is exactly g_k, its head's gradient h_k."""

    def __init__(self, names=NAMES):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.w = nn.Parameter(torch.zeros(2))
        self.heads = nn.ParameterDict({t: nn.Parameter(torch.tensor([0.5, -1.0]) * (i + 1)) for i, t in enumerate(names)})


def _tasks(names=NAMES):
    return TaskSet([Task(names[0], "regression", primary=True), *(Task(n, "regression") for n in names[1:])])


def _direction(method, grads, *, unlabelled=(), seed=0, model=None):
    names = list(grads)
    tasks = _tasks(names)
    model = model or Linear(names)
    if not hasattr(method, "_shared_ids"):
        method.setup(model, SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=1, seed=seed))
    w = model.backbone.w
    losses = {n: (torch.tensor(g) @ w + 0.5 * (model.heads[n] ** 2).sum()).reshape(1) for n, g in grads.items()}
    masks = {n: torch.tensor([n not in unlabelled]) for n in names}
    losses = {n: torch.where(masks[n], v, torch.zeros_like(v)) for n, v in losses.items()}
    terms = LossTerms(tasks=tasks, losses=losses, masks=masks, outputs={}, features={}, targets={})
    params = [w, *(model.heads[n] for n in names)]
    return method.direction(terms, params), model


needs_torchjd = pytest.mark.skipif(importlib.util.find_spec("torchjd") is None, reason='needs pip install "auxnb[aggregators]"')


@needs_torchjd
def test_pcgrad_projects_each_conflicting_gradient_onto_the_others_normal_plane_as_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1·g2 = -1 < 0: they conflict
    # Yu et al. Eq. 1 by hand: g1' = g1 − (g1·g2/‖g2‖²) g2, g2' = g2 − (g2·g1/‖g1‖²) g1; PCGrad sums them
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g2 @ g1) / (g1 @ g1) * g1)
    (d_w, d_main, d_a1), model = _direction(methods.get("aggregator", aggregator="pcgrad"),
                                            {"main": g1.tolist(), "a1": g2.tolist()})
    assert torch.allclose(d_w, expected) and torch.allclose(expected, torch.tensor([0.5, 1.5]))
    # the heads: each its own task's gradient (h_k), untouched by the aggregator
    assert torch.equal(d_main, model.heads["main"].detach()) and torch.equal(d_a1, model.heads["a1"].detach())


@needs_torchjd
def test_pcgrad_leaves_agreeing_gradients_as_their_sum():
    (d_w, *_), _ = _direction(methods.get("aggregator", aggregator="pcgrad"), {"main": [1.0, 2.0], "a1": [3.0, 0.5]})
    assert torch.allclose(d_w, torch.tensor([4.0, 2.5]))


@needs_torchjd
def test_mgda_on_orthogonal_gradients_is_the_min_norm_point_with_weights_inverse_to_squared_norms():
    # min over the convex hull of ‖w g1 + (1−w) g2‖² with g1 ⟂ g2: w = ‖g2‖² / (‖g1‖² + ‖g2‖²)
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    w = (g2 @ g2) / (g1 @ g1 + g2 @ g2)
    (d_w, *_), _ = _direction(methods.get("aggregator", aggregator="mgda"), {"main": g1.tolist(), "a1": g2.tolist()})
    assert torch.allclose(d_w, w * g1 + (1 - w) * g2, atol=1e-4)
    assert torch.allclose(d_w, torch.tensor([0.8, 0.4]), atol=1e-4)


@needs_torchjd
def test_upgrad_and_dualproj_on_orthogonal_gradients_give_their_mean():
    # orthogonal rows already lie in each other's dual cone: the projections change nothing
    for name in ("upgrad", "dualproj"):
        (d_w, *_), _ = _direction(methods.get("aggregator", aggregator=name), {"main": [1.0, 0.0], "a1": [0.0, 2.0]})
        assert torch.allclose(d_w, torch.tensor([0.5, 1.0]), atol=1e-4), name


@needs_torchjd
def test_primary_keep_adds_the_primary_gradient_whole_to_the_aggregated_auxiliary_gradients():
    g = {"main": [-3.0, 1.0], "a1": [1.0, 0.0], "a2": [0.0, 2.0]}
    (d_w, *_), _ = _direction(methods.get("aggregator", aggregator="mgda", primary="keep"), g)
    # MGDA of the auxiliary rows only (orthogonal: weights 0.8, 0.2), the primary row added as it is
    assert torch.allclose(d_w, torch.tensor([-3.0, 1.0]) + torch.tensor([0.8, 0.4]), atol=1e-4)


@needs_torchjd
def test_a_task_without_labels_in_the_batch_is_left_out_of_the_matrix_instead_of_zeroing_mgda():
    method = methods.get("aggregator", aggregator="mgda")
    (d_w, *_), _ = _direction(method, {"main": [1.0, 0.0], "a1": [0.0, 2.0], "a2": [5.0, 5.0]}, unlabelled=("a2",))
    # with a2's zero row MGDA's min-norm point would be 0; without it, the two-task closed form
    assert torch.allclose(d_w, torch.tensor([0.8, 0.4]), atol=1e-4)
    assert method.trace() == {"aggregator/rows": 2.0}


@needs_torchjd
def test_pcgrad_order_is_seeded_by_run_and_step_and_leaves_the_process_rng_untouched():
    g = {"main": [1.0, 0.0, 0.0], "a1": [-1.0, 1.0, 0.0], "a2": [0.0, -1.0, 1.0]}

    class Linear3(Linear):
        def __init__(self, names=NAMES):
            super().__init__(names)
            self.backbone.w = nn.Parameter(torch.zeros(3))

    def run(seed):
        method = methods.get("aggregator", aggregator="pcgrad")
        model = Linear3()
        return [_direction(method, g, seed=seed, model=model)[0][0] for _ in range(6)]

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = run(0)
    assert torch.equal(torch.get_rng_state(), before)
    b = run(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # with three mutually conflicting gradients the projection order matters: steps differ
    assert len({tuple(x.tolist()) for x in a}) > 1


@needs_torchjd
def test_nash_mtl_resumed_from_its_state_dict_continues_exactly_as_the_uninterrupted_run():
    pytest.importorskip("cvxpy")
    steps = [{"main": [1.0, 0.2], "a1": [-0.5, 1.0], "a2": [0.3, -0.7]},
             {"main": [0.8, 0.1], "a1": [-0.2, 1.3], "a2": [0.5, -0.2]},
             {"main": [1.1, -0.3], "a1": [0.1, 0.9], "a2": [-0.4, -0.6]}]
    whole = methods.get("aggregator", aggregator="nash-mtl")
    model = Linear()
    out = [_direction(whole, g, model=model)[0][0] for g in steps]
    first = methods.get("aggregator", aggregator="nash-mtl")
    model1 = Linear()
    _direction(first, steps[0], model=model1)
    state = first.state_dict()
    resumed = methods.get("aggregator", aggregator="nash-mtl")
    model2 = Linear()
    resumed.setup(model2, SetupInfo(tasks=_tasks(), device=torch.device("cpu"), num_train=1, seed=0))
    resumed.load_state_dict(state)
    again = [_direction(resumed, g, model=model2)[0][0] for g in steps[1:]]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(out[1:], again))


@needs_torchjd
def test_the_fp16_loss_scale_multiplies_the_direction_even_for_a_non_homogeneous_aggregator():
    pytest.importorskip("cvxpy")
    g = {"main": [3.0, 0.2], "a1": [-0.5, 2.0]}
    plain = _direction(methods.get("aggregator", aggregator="nash-mtl"), g)[0]
    scaled_method = methods.get("aggregator", aggregator="nash-mtl")
    scaled_method._loss_scale = 1024.0
    scaled = _direction(scaled_method, g)[0]
    # Nash-MTL clips ‖d‖ to max_norm = 1: aggregating the scaled gradients would clip 1024× more
    assert all(torch.allclose(s / 1024.0, p, atol=1e-5) for s, p in zip(scaled, plain))
    assert scaled_method._scale_applied


def test_unknown_aggregator_and_primary_mode_are_clear_errors_naming_the_choices():
    with pytest.raises(ValueError, match="Unknown aggregator 'graddrop'; use one of pcgrad, cagrad, nash-mtl"):
        methods.get("aggregator", aggregator="graddrop")
    if importlib.util.find_spec("torchjd") is not None:
        with pytest.raises(ValueError, match="primary must be one of"):
            methods.get("aggregator", primary="first")


def test_without_torchjd_the_method_says_how_to_install_it_before_any_work(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchjd" else real(name, *a))
    with pytest.raises(ImportError, match=r'torchjd is not installed: pip install "auxnb\[aggregators\]"'):
        methods.get("aggregator", aggregator="upgrad")


@needs_torchjd
def test_group_aux_aggregates_the_primary_row_with_the_sum_of_the_auxiliary_gradients():
    # rows (1, 0) and (0, 1) + (0, 1) = (0, 2): MGDA's closed form for orthogonal rows, (0.8, 0.4)
    method = methods.get("aggregator", aggregator="mgda", group_aux=True)
    (d_w, *_), _ = _direction(method, {"main": [1.0, 0.0], "a1": [0.0, 1.0], "a2": [0.0, 1.0]})
    assert torch.allclose(d_w, torch.tensor([0.8, 0.4]), atol=1e-4)
    assert method.trace() == {"aggregator/rows": 2.0}


@needs_torchjd
def test_the_module_docstring_examples_run():
    import doctest

    from auxnb.methods import aggregated

    assert doctest.testmod(aggregated).failed == 0
