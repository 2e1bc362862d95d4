"""Many auxiliary tasks (issue 14): heads in one product, binary losses in one op, same numbers."""

from __future__ import annotations

import torch

from auxnb.methods.base import compute_terms
from auxnb.models import MLP, MultiHeadModel
from auxnb.tasks import PRIMARY_STREAM, Task, TaskSet


def _setup(n_aux=12, seed=0):
    torch.manual_seed(seed)
    tasks = TaskSet([Task("y", "classification", 3, primary=True)] + [Task(f"a{i}", "binary") for i in range(n_aux)])
    model = MultiHeadModel.for_tasks(MLP(4, hidden=(8,)), tasks)
    x = torch.randn(6, 4)
    targets = {"y": torch.randint(0, 3, (6,)), **{f"a{i}": torch.randint(0, 2, (6,)).float() for i in range(n_aux)}}
    targets["a3"][[1, 4]] = float("nan")  # missing labels: zero loss, zero gradient
    return tasks, model, x, targets


def test_batched_heads_equal_each_head_alone():
    tasks, model, x, _ = _setup()
    features, outs = model(x)
    for name in tasks.names:
        torch.testing.assert_close(outs[name], model.heads[name](features), rtol=1e-6, atol=1e-6)
    assert [n for n in outs] == tasks.names


def test_grouped_binary_losses_are_the_per_task_losses_bit_for_bit():
    tasks, model, x, targets = _setup()
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, tasks)
    for task in tasks:
        ref = task.loss(terms.outputs[task.name], targets[task.name])
        assert torch.equal(terms.losses[task.name], ref), task.name
        assert torch.equal(terms.masks[task.name], task.labelled(targets[task.name]))
    assert terms.losses["a3"][[1, 4]].eq(0).all()
    # gradients too: the sum of the grouped losses against the per-head, per-task computation
    params = list(model.parameters())
    grouped = torch.autograd.grad(sum(terms.losses[n].mean() for n in tasks.names), params)
    features = model.backbone(x)
    alone = sum(t.loss(model.heads[t.name](features), targets[t.name]).mean() for t in tasks)
    for a, b in zip(grouped, torch.autograd.grad(alone, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _maoal_direction(chunk, init, batched=False, create_graph=False):
    from auxnb.methods import MAOAL
    from auxnb.methods.base import SetupInfo

    tasks, model, x, targets = _setup(n_aux=10, seed=1)
    method = MAOAL(init=init, batched=batched)
    method.grad_chunk = chunk
    method.setup(model, SetupInfo(tasks=tasks, device=torch.device("cpu"), num_train=6, seed=0))
    params = [p for p in model.parameters() if p.requires_grad]
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, tasks)
    out = method.direction(terms, params, create_graph=create_graph)
    return out, method


def test_maoal_chunked_per_loss_gradients_give_the_same_direction():
    for init in (1.0, "grad-ratio"):
        for batched in (False, True):
            full, m_full = _maoal_direction(100, init, batched)  # 10 aux losses in one go
            chunked, m_chunk = _maoal_direction(3, init, batched)  # 4 chunks of at most 3
            for a, b in zip(full, chunked):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(m_full.alpha, m_chunk.alpha)  # grad-ratio init from chunked norms
            assert torch.equal(m_full._reach, m_chunk._reach)
    # the upper step's direction (graph to α) too: same value and same ∂/∂α
    full, m_full = _maoal_direction(100, 1.0, create_graph=True)
    chunked, m_chunk = _maoal_direction(3, 1.0, create_graph=True)
    ga = torch.autograd.grad(sum(g.sum() for g in full), m_full.alpha)[0]
    gb = torch.autograd.grad(sum(g.sum() for g in chunked), m_chunk.alpha)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


# --- issue 14 (many tasks): the upper step's second-order graph and vector arithmetic, same bits ---


def _second_order_setup(n_aux=20, seed=2):
    """A weighted loss over many binary heads (JTDS-like: per-task weights w as φ) and its gradient g
    with a graph; returns what a Hessian-vector product needs."""
    tasks, model, x, targets = _setup(n_aux=n_aux, seed=seed)
    params = tuple(p for p in model.parameters() if p.requires_grad)
    w = torch.rand(len(tasks), requires_grad=True)
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, tasks)
    loss = sum(w[i] * terms.mean(n) for i, n in enumerate(tasks.names))
    g = torch.autograd.grad(loss, params, create_graph=True)
    u = tuple(torch.randn_like(p) for p in params)
    return tasks, model, x, targets, params, w, g, u


def test_ops_cat_and_stack_equal_torch_in_values_and_first_and_second_derivatives():
    from auxnb import _ops

    torch.manual_seed(0)
    parts = [torch.randn(2, 3, requires_grad=True) for _ in range(5)]
    for mine, theirs, kw in ((_ops.cat, torch.cat, {"dim": 1}), (_ops.stack, torch.stack, {"dim": 1}),
                             (_ops.cat, torch.cat, {"dim": -1}), (_ops.stack, torch.stack, {"dim": -1})):
        a, b = mine(parts, **kw), theirs(parts, **kw)
        assert torch.equal(a, b)
        # a second-order quantity: d/dparts of ‖∂(Σ c·out²)/∂parts‖²
        c = torch.randn_like(a)
        ga = torch.autograd.grad((c * a**2).sum(), parts, create_graph=True)
        gb = torch.autograd.grad((c * b**2).sum(), parts, create_graph=True)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
        ha = torch.autograd.grad(sum((x**2).sum() for x in ga), parts)
        hb = torch.autograd.grad(sum((x**2).sum() for x in gb), parts)
        assert all(torch.equal(x, y) for x, y in zip(ha, hb))
    # no gradient wanted, or mixed dtypes: torch's own op (its backward casts each gradient back)
    assert _ops.cat([torch.ones(1), torch.ones(1, dtype=torch.float64)]).dtype == torch.float64


def test_batched_heads_hessian_vector_products_equal_torch_cat_bit_for_bit(monkeypatch):
    """The heads and the grouped losses joined by `_ops.cat` (a one-node backward) give the same
    Hessian-vector products, θ and φ, as with torch.cat (the code before, kept here as the reference)."""
    from auxnb import _ops
    from auxnb.hypergrad import _vjp

    def products():
        torch.manual_seed(5)
        *_, params, w, g, u = _second_order_setup()
        return _vjp(g, params, u, retain_graph=True), _vjp(g, (w,), u, retain_graph=False)

    fast = products()
    monkeypatch.setattr(_ops, "cat", lambda tensors, dim=0: torch.cat(list(tensors), dim))
    reference = products()
    for mine, ref in zip(fast, reference):
        assert all(torch.equal(a, b) for a, b in zip(mine, ref))


def test_hypergrad_vector_arithmetic_equals_the_per_tensor_loop_bit_for_bit():
    """`_axpy`, `_norm`, the Neumann sum and the power iteration run on torch._foreach_* ops: the same
    bits as the Python loops they replaced (written out here as the reference)."""
    from auxnb import hypergrad as hg

    torch.manual_seed(3)
    x = tuple(torch.randn(s) for s in [(4, 3), (3,), (1, 8), (1,)] * 20)
    y = tuple(torch.randn_like(t) for t in x)
    assert all(torch.equal(a, torch.add(b, c, alpha=-0.3)) for a, b, c in zip(hg._axpy(-0.3, x, y), y, x))
    alpha = torch.tensor(0.7)
    assert all(torch.equal(a, b + alpha * c) for a, b, c in zip(hg._axpy(alpha, x, y), y, x))
    assert torch.equal(hg._norm(x), torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in x])))
    assert all(torch.equal(a, 0.37 * b) for a, b in zip(hg._scale(x, 0.37), x))

    # the Neumann solver and the power iteration on a real second-order graph with 40+ tensors
    *_, params, w, g, u = _second_order_setup()
    matvec = hg._transpose_matvec(g, params)

    def neumann_reference(b, terms=3, lr=0.1):
        p, acc = tuple(b), tuple(b)
        for _ in range(terms):
            p = tuple(torch.add(pi, qi, alpha=-lr) for qi, pi in zip(matvec(p), p))
            acc = tuple(torch.add(ai, pi, alpha=1.0) for pi, ai in zip(p, acc))
        return tuple(lr * a for a in acc)

    got = hg.solve_neumann(3, 0.1)(matvec, u)
    assert all(torch.equal(a, b) for a, b in zip(got, neumann_reference(u)))

    def power_reference(iters=20, tol=1e-4):
        gen = torch.Generator().manual_seed(11)
        x = hg._random_like(params, gen)
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in x])))
        x = tuple(t / norm for t in x)
        estimate = 0.0
        for _ in range(iters):
            y = matvec(x)
            previous, estimate = estimate, float(hg._dot(x, y))
            size = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in y])))
            if size == 0.0:
                break
            x = tuple(t / size for t in y)
            if abs(estimate - previous) <= tol * abs(estimate):
                break
        return estimate

    assert hg.largest_eigenvalue(g, params, generator=torch.Generator().manual_seed(11)) == power_reference()


def test_trainer_optimisers_step_with_foreach_and_give_the_loops_bits():
    """The Trainer's SGD/Adam/AdamW use foreach=True (one call over all tensors): the same parameters,
    bit for bit, as the per-tensor loop (foreach=False) after several steps."""
    from auxnb.train import Trainer

    for spec, kwargs in (("sgd", {"momentum": 0.9, "weight_decay": 5e-4}), ("adam", {"weight_decay": 1e-4}),
                         ("adamw", {"weight_decay": 1e-2})):
        torch.manual_seed(0)
        params = [torch.randn(s, requires_grad=True) for s in [(3, 4), (4,), (1, 8), (1,)] * 10]
        ref_params = [p.detach().clone().requires_grad_(True) for p in params]
        trainer = Trainer.__new__(Trainer)
        trainer.optimizer_spec, trainer.lr = spec, 0.01
        trainer.momentum = kwargs.get("momentum", 0.0)
        trainer.weight_decay = kwargs["weight_decay"]
        opt = trainer._make_optimizer(params)
        assert opt.param_groups[0]["foreach"] is True
        cls = type(opt)
        ref = cls(ref_params, lr=0.01, foreach=False, **kwargs)
        for _ in range(5):
            for p, q in zip(params, ref_params):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            opt.step()
            ref.step()
        assert all(torch.equal(p, q) for p, q in zip(params, ref_params)), spec


def test_finite_check_of_many_losses_still_names_the_task():
    """With many tasks the Trainer checks all losses in one op; a non-finite one is still named."""
    import pytest

    from auxnb.train import _check_finite

    tasks, model, x, targets = _setup(n_aux=12)
    terms = compute_terms(model, {PRIMARY_STREAM: (x, targets)}, tasks)
    _check_finite(terms, 3)  # all finite: no error
    terms.losses["a7"] = terms.losses["a7"].detach().clone()
    terms.losses["a7"][2] = float("inf")
    with pytest.raises(FloatingPointError, match="'a7' at lower step 3"):
        _check_finite(terms, 3)
