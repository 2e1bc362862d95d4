"""Hard parameter sharing: one backbone, one head per task, features and per-task outputs.

The model only computes outputs; it never computes losses, never weights tasks (that is a
method's job) and never moves itself to a device. Many same-shape linear heads (CUB's 312
attribute heads) are stored as one `LinearBank` (issue 23): two parameter tensors instead of two
per head, one product in the forward pass; ``model.heads[name]`` still gives each head (a
`BankHead` view of its row) and partitions still give each head its own block.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ops

__all__ = ["Backbone", "BankHead", "ChildBlocks", "HeadDict", "HeadOutputs", "LinearBank", "MultiHeadModel", "make_head"]

HEAD_PREFIX = "head:"


@runtime_checkable
class Backbone(Protocol):
    """What auxnb expects of a backbone: ``forward(x) -> [batch, out_features]`` and its blocks.

    ``blocks()`` lists ``(name, module)`` pairs from input to output whose parameters together
    are all the backbone's parameters, each exactly once: they are MAOAL's Block-L "modules"
    (paper §4.3; supplement §3 numbers them from the shallowest, module 0).
    """

    out_features: int

    def blocks(self) -> list[tuple[str, nn.Module]]: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class ChildBlocks(nn.Module):
    """A backbone without ``blocks()``, given the blocks of its direct children that hold parameters.

    Its ``forward`` is the wrapped module's; the wrapped module is ``.net``. When the module
    holds parameters of its own (not inside a child), it is one block, ``"net"``.
    """

    def __init__(self, net: nn.Module, out_features: int | None = None) -> None:
        super().__init__()
        self.net = net
        if out_features is not None:
            self.out_features = int(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        if any(True for _ in self.net.parameters(recurse=False)):
            return [("net", self.net)]
        return [(name, child) for name, child in self.net.named_children() if any(True for _ in child.parameters())]


def _feature_size(backbone: nn.Module, example) -> int:
    from ..checks import integer_inputs_hint

    if not isinstance(example, torch.Tensor):
        import numpy as np

        example = np.asarray(example)
        example = torch.from_numpy(example.astype(np.float32) if example.dtype.kind == "f" else example)
    if example.dim() < 1 or example.shape[0] < 1:
        raise ValueError("example must be a batch of at least one input, e.g. x[:2].")
    param = next(backbone.parameters(), None)
    if param is not None:
        example = example.to(param.device)
        if example.is_floating_point() and param.is_floating_point():
            example = example.to(param.dtype)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = backbone(example)
    except Exception as err:  # noqa: BLE001 - any failure of the user's module gets the same context
        raise ValueError(
            f"The backbone failed on the example inputs {tuple(example.shape)} {example.dtype}: "
            f"{type(err).__name__}: {err}.{integer_inputs_hint(example)}"
        ) from None
    finally:
        backbone.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != example.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"The backbone returned {shape} for {example.shape[0]} inputs; it must return features [B, d]. End it "
            "with nn.Flatten() (nn.Sequential(backbone, nn.Flatten())), or for a torchvision ResNet set "
            "net.fc = nn.Identity()."
        )
    return int(out.shape[1])


def make_head(in_features: int, out_dim: int, hidden: int | None = None) -> nn.Module:
    """A task head: ``Linear`` (MAOAL supplement §2.1–2.3: "a one-layer head for each task"), or
    ``Linear → ReLU → Linear`` when ``hidden`` is an int (§2.4: "a 2-layer MLP with hidden
    dimension 16" for rating prediction).

    Example:
        >>> make_head(8, 3)
        Linear(in_features=8, out_features=3, bias=True)
        >>> make_head(8, 1, hidden=16)(torch.zeros(2, 8)).shape
        torch.Size([2, 1])
    """
    if in_features < 1 or out_dim < 1:
        raise ValueError(f"make_head needs positive sizes, got in_features={in_features}, out_dim={out_dim}.")
    if hidden is None:
        return nn.Linear(in_features, out_dim)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be None or a positive int, got {hidden!r}.")
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class LinearBank(nn.Module):
    """K linear heads of one shape ``in_features → out_features`` stored as one module.

    ``weight`` is ``[K, out_features, in_features]`` and ``bias`` ``[K, out_features]``: row k is
    head k's ``nn.Linear`` weight and bias, exactly (``weight[k]`` has ``nn.Linear``'s layout). Two
    parameter tensors instead of 2K: one matrix product in the forward pass, one tensor for the
    optimiser, the gradient clip and the upper step's vector arithmetic (CUB's 312 attribute heads;
    `MultiHeadModel` banks same-shape linear heads above `MultiHeadModel.BANK_HEADS`).

    Args:
        heads: task name → ``nn.Linear`` with a bias, all of one shape, dtype and device; their
            current weights are copied (so a bank built from freshly made heads has exactly their
            initialisation). The modules themselves are not kept.
    """

    def __init__(self, heads: Mapping[str, nn.Linear]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("LinearBank needs at least one head.")
        items = list(heads.items())
        first = items[0][1]
        for name, head in items:
            if type(head) is not nn.Linear or head.bias is None:
                raise TypeError(f"LinearBank holds plain nn.Linear heads with a bias; head {name!r} is {head!r}.")
            if (head.in_features, head.out_features, head.weight.dtype, head.weight.device) != (
                first.in_features, first.out_features, first.weight.dtype, first.weight.device
            ):
                raise ValueError(
                    f"LinearBank heads must share one shape, dtype and device: head {name!r} is {head.in_features} → "
                    f"{head.out_features} {head.weight.dtype} on {head.weight.device}, head {items[0][0]!r} is "
                    f"{first.in_features} → {first.out_features} {first.weight.dtype} on {first.weight.device}."
                )
        self.names = tuple(name for name, _ in items)
        self.in_features, self.out_features = first.in_features, first.out_features
        with torch.no_grad():
            self.weight = nn.Parameter(torch.stack([h.weight.detach() for _, h in items]).clone())
            self.bias = nn.Parameter(torch.stack([h.bias.detach() for _, h in items]).clone())
        self.weight.requires_grad_(all(h.weight.requires_grad for _, h in items))
        self.bias.requires_grad_(all(h.bias.requires_grad for _, h in items))
        self._index = {name: k for k, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Row of head `name` in `weight` and `bias`."""
        return self._index[name]

    def forward(self, x: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Outputs of the heads `rows` (all when None) side by side: ``[B, len(rows) * out_features]``,
        head after head (the columns of head ``rows[j]`` are ``j*out : (j+1)*out``)."""
        weight, bias = self.weight, self.bias
        if rows is not None and list(rows) != list(range(len(self.names))):
            idx = torch.as_tensor(list(rows), dtype=torch.long, device=weight.device)
            weight, bias = weight.index_select(0, idx), bias.index_select(0, idx)
        if x.is_floating_point() and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        return F.linear(x, weight.reshape(-1, self.in_features), bias.reshape(-1))

    def extra_repr(self) -> str:
        return f"{len(self.names)} heads, in_features={self.in_features}, out_features={self.out_features}"


class BankHead(nn.Module):
    """One head of a `LinearBank`, seen as a linear layer: ``model.heads[name]`` for a banked head.

    ``weight`` and ``bias`` are views of the bank's row (writing into them writes the bank); it
    owns no parameter (``parameters()`` is empty: the bank's tensors are the model's parameters,
    counted once), so freeze or move the bank, ``model.head_banks``, not the view. ``param_rows()``
    names the rows it occupies: `auxnb.partition.by_block` makes it its own block.
    """

    def __init__(self, bank: LinearBank, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "_bank", bank)  # not registered: the bank is the model's, not the view's
        self.name = name
        self.in_features, self.out_features = bank.in_features, bank.out_features

    @property
    def bank(self) -> LinearBank:
        return self._bank

    @property
    def row(self) -> int:
        return self._bank.index(self.name)

    @property
    def weight(self) -> torch.Tensor:
        return self._bank.weight[self.row]

    @property
    def bias(self) -> torch.Tensor:
        return self._bank.bias[self.row]

    def param_rows(self) -> list[tuple[nn.Parameter, int]]:
        """``(bank parameter, row)`` pairs holding this head's values (dim 0 of each parameter)."""
        return [(self._bank.weight, self.row), (self._bank.bias, self.row)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.is_floating_point() and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"row {self.row} of a LinearBank, in_features={self.in_features}, out_features={self.out_features}"


class HeadDict(nn.ModuleDict):
    """``model.heads``: task name → head, in task order, whether the head is its own module or a
    row of a `LinearBank` (then a `BankHead` view, not a registered submodule: its values are the
    bank's parameters, ``model.head_banks``). Reading works as on an ``nn.ModuleDict``; a banked
    head cannot be replaced or removed (rebuild the model instead)."""

    def __init__(self, modules: Mapping[str, nn.Module], order: Sequence[str], views: Mapping[str, BankHead]) -> None:
        super().__init__(modules)
        self._order = list(order)
        self._views = dict(views)

    def __getitem__(self, key: str) -> nn.Module:
        if key in self._views:
            return self._views[key]
        return super().__getitem__(key)

    def __setitem__(self, key: str, module: nn.Module) -> None:
        if key in getattr(self, "_views", {}):
            raise TypeError(f"Head {key!r} is a row of a LinearBank and cannot be replaced; rebuild the model with the new head.")
        super().__setitem__(key, module)
        if hasattr(self, "_order") and key not in self._order:
            self._order.append(key)

    def __delitem__(self, key: str) -> None:
        if key in self._views:
            raise TypeError(f"Head {key!r} is a row of a LinearBank and cannot be removed; rebuild the model without it.")
        super().__delitem__(key)
        self._order.remove(key)

    def __contains__(self, key: object) -> bool:
        return key in self._views or key in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def keys(self):  # type: ignore[override]
        return list(self._order)

    def extra_repr(self) -> str:
        banked = [n for n in self._order if n in self._views]
        shown = ", ".join(banked[:3]) + (f", ... {banked[-1]}" if len(banked) > 3 else "")
        return f"{len(banked)} heads are rows of head_banks (BankHead views): {shown}" if banked else ""

    def items(self):  # type: ignore[override]
        return [(name, self[name]) for name in self._order]

    def values(self):  # type: ignore[override]
        return [self[name] for name in self._order]


class HeadOutputs(dict):
    """`MultiHeadModel.head_forward`'s result: task name → output, plus ``joint``: for the heads of
    each `LinearBank`, their names → their outputs side by side ``[B, K * out]`` (the tensor each
    head's output is a slice of), so that a loss over all of them needs no concatenation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.joint: dict[tuple[str, ...], torch.Tensor] = {}


class MultiHeadModel(nn.Module):
    """A shared backbone with one head per task (hard parameter sharing, MAOAL §3 / JTDS §3).

    ``forward(x, tasks)`` returns the backbone features (JTDS feeds them, detached, to its
    schedule; DTG and F-MixUp mix them) and a dict task name → head output, computing only the
    requested heads so that a batch of one input stream (e.g. rotated images) pays only for the
    heads that read it.

    Args:
        backbone: a module mapping inputs to ``[batch, features]``; `blocks` needs it to define
            ``blocks()`` (every auxnb backbone does).
        heads: task name → head module. Names are the keys of the targets dict.
        bank: store same-shape plain ``nn.Linear`` heads as one `LinearBank` per shape (their
            values copied: same initial weights): ``None`` (default) when at least `BANK_HEADS`
            share a shape (CUB's 312 attributes), ``True`` for any group of two or more, ``False``
            never. ``model.heads[name]`` works either way (a banked head is a `BankHead` view of
            its row); the parameters are then ``head_banks.linear<i>.weight`` ``[K, out, in]`` and
            ``.bias`` ``[K, out]`` instead of ``heads.<name>.weight`` / ``.bias``, so a checkpoint
            of one layout does not load into the other (resuming one is refused, naming the change).

    Example:
        >>> from auxnb.models import MLP
        >>> model = MultiHeadModel(MLP(4, hidden=(8,)), {"main": make_head(8, 3), "aux": make_head(8, 1)})
        >>> features, outputs = model(torch.zeros(2, 4), tasks=["aux"])
        >>> features.shape, list(outputs), outputs["aux"].shape
        (torch.Size([2, 8]), ['aux'], torch.Size([2, 1]))
    """

    #: With at least this many plain ``nn.Linear`` heads of one shape (``bank=None``), they are
    #: stored as one `LinearBank` (``model.head_banks``): CUB's 312 attribute heads are two
    #: parameter tensors instead of 624. Every auxnb setting with fewer tasks keeps one module per head.
    BANK_HEADS = 32

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module], *, bank: bool | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}.")
        if not heads:
            raise ValueError("MultiHeadModel needs at least one head (task name -> module).")
        if bank is not None and not isinstance(bank, bool):
            raise TypeError(f"bank must be None (automatic), True or False, got {bank!r}.")
        for name, head in heads.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"Head names must be non-empty strings without '.', got {name!r}.")
            if not isinstance(head, nn.Module):
                raise TypeError(f"Head {name!r} must be an nn.Module, got {type(head).__name__}.")
        self.backbone = backbone
        groups = self._bank_groups(heads, bank)
        if not groups:
            self.heads = nn.ModuleDict(dict(heads))
            return
        banked = {name for names in groups for name in names}
        self.head_banks = nn.ModuleDict({
            f"linear{k}": LinearBank({name: heads[name] for name in names}) for k, names in enumerate(groups)
        })
        views = {name: BankHead(b, name) for b in self.head_banks.values() for name in b.names}
        self.heads = HeadDict({n: h for n, h in heads.items() if n not in banked}, list(heads), views)

    def _bank_groups(self, heads: Mapping[str, nn.Module], bank: bool | None) -> list[list[str]]:
        """Names of the heads to bank, one list per shape (dtype, device): plain ``nn.Linear`` heads with
        a bias, groups of at least `BANK_HEADS` (``bank=None``) or 2 (``bank=True``); none when False."""
        if bank is False:
            return []
        by_shape: dict[tuple, list[str]] = {}
        for name, head in heads.items():
            if type(head) is nn.Linear and head.bias is not None:
                key = (head.in_features, head.out_features, head.weight.dtype, head.weight.device,
                       head.weight.requires_grad, head.bias.requires_grad)
                by_shape.setdefault(key, []).append(name)
        least = 2 if bank else self.BANK_HEADS
        return [names for names in by_shape.values() if len(names) >= least]

    @property
    def banked(self) -> bool:
        """Whether some heads are stored in a `LinearBank` (``head_banks``)."""
        return "head_banks" in self._modules

    def adapt_head_layout(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model weights `state` (e.g. a results file's) with the task heads in this model's layout.

        A state written when the heads were one ``nn.Linear`` each (``heads.<task>.weight``) gets them
        stacked into this model's banks (``head_banks.linear<i>.weight`` ``[K, out, in]``); a state
        written with banks gets each bank row split into its head's entries. The values are not
        changed (row k of a bank *is* head k's ``nn.Linear`` weight and bias), so the model computes
        exactly what the saved one did. Every other entry passes through, and a state already in this
        layout comes back as it is. Only weights move: an optimiser's state does not (a training
        checkpoint in the other layout is refused instead, `auxnb.checkpoint.check_model_layout`).

        Raises:
            ValueError: a saved bank's rows cannot be matched to this model's heads (another model).
        """
        state = dict(state)
        if set(state) == set(self.state_dict()):
            return state
        prefix = "head_banks."
        saved_banks = sorted({k.split(".")[1] for k in state if k.startswith(prefix)},
                             key=lambda b: int(b[len("linear"):]) if b[len("linear"):].isdigit() else -1)
        if saved_banks:  # split each saved bank's rows into per-head entries
            per_head = {k.split(".")[1] for k in state if k.startswith("heads.")}
            free = [n for n in self.task_names if n not in per_head]
            for bank in saved_banks:
                weight, bias = state.pop(f"{prefix}{bank}.weight", None), state.pop(f"{prefix}{bank}.bias", None)
                if weight is None or bias is None or weight.dim() != 3:
                    raise ValueError(f"The saved bank {bank!r} is not a LinearBank's weight [K, out, in] and bias [K, out].")
                shape = (weight.shape[1], weight.shape[2])
                names = [n for n in free if (getattr(self.heads[n], "out_features", None),
                                             getattr(self.heads[n], "in_features", None)) == shape][: weight.shape[0]]
                if len(names) != weight.shape[0]:
                    raise ValueError(
                        f"The saved bank {bank!r} holds {weight.shape[0]} heads of shape {shape[1]} → {shape[0]}, but this "
                        f"model has {len(names)} such linear heads not saved on their own: it is not the saved model."
                    )
                for k, name in enumerate(names):
                    state[f"heads.{name}.weight"], state[f"heads.{name}.bias"] = weight[k], bias[k]
                free = [n for n in free if n not in names]
        if self.banked:  # stack per-head entries into this model's banks
            for key, bank in self.head_banks.items():
                wanted = [f"heads.{n}.{p}" for n in bank.names for p in ("weight", "bias")]
                if all(k in state for k in wanted):
                    state[f"{prefix}{key}.weight"] = torch.stack([state.pop(f"heads.{n}.weight") for n in bank.names])
                    state[f"{prefix}{key}.bias"] = torch.stack([state.pop(f"heads.{n}.bias") for n in bank.names])
        return state

    @classmethod
    def for_tasks(cls, backbone: nn.Module, tasks: Iterable, hidden: int | None = None, *,
                  bank: bool | None = None) -> "MultiHeadModel":
        """One `make_head` per task (objects with ``.name`` and ``.out_dim``, e.g. `auxnb.tasks.Task`).

        The heads are made one by one in task order, so the initial weights are the same whether
        or not they are then banked (`bank`, see the class docstring).

        Example:
            >>> from auxnb.models import MLP
            >>> from auxnb.tasks import Task
            >>> model = MultiHeadModel.for_tasks(MLP(4, hidden=(8,)), [Task("y", "regression", primary=True)])
            >>> model.task_names
            ['y']
        """
        in_features = getattr(backbone, "out_features", None)
        if not isinstance(in_features, int):
            raise TypeError(
                f"{type(backbone).__name__} has no integer `out_features`; set it to the feature size "
                "or build the heads yourself and call MultiHeadModel(backbone, heads)."
            )
        heads: dict[str, nn.Module] = {}
        for task in tasks:
            if task.name in heads:
                raise ValueError(f"Duplicate task name {task.name!r}; every task needs its own head.")
            heads[task.name] = make_head(in_features, task.out_dim, hidden)
        return cls(backbone, heads, bank=bank)

    @classmethod
    def wrap(
        cls, backbone: nn.Module, tasks: Iterable, example: torch.Tensor | None = None, *, hidden: int | None = None,
        bank: bool | None = None,
    ) -> "MultiHeadModel":
        """Any backbone ``x -> [B, d]`` plus one head per task, in one line.

        `out_features` is read from the backbone when it declares it, else inferred by a dry run
        on `example` (a few inputs, e.g. ``x[:2]``; eval mode, no gradients, the model and the
        random state untouched). A backbone without ``blocks()`` is wrapped in `ChildBlocks`,
        whose blocks are its direct children that hold parameters (a torchvision ResNet gives
        conv1, bn1, layer1 … layer4), so module-aware methods (MAOAL) and `by_block` work; it
        pickles (no lambdas), so ``torch.save(model)`` works too.

        Example:
            >>> from torch import nn
            >>> from auxnb.tasks import Task
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
            >>> model = MultiHeadModel.wrap(net, [Task("y", "classification", 3, primary=True)], torch.zeros(2, 1, 2, 2))
            >>> model.out_features, [name for name, _ in model.blocks()]
            (6, ['1', '3', 'head:y'])

        A torchvision ResNet: drop its classifier so it returns features, then wrap it::

            net = torchvision.models.resnet18(num_classes=10); net.fc = nn.Identity()
            model = MultiHeadModel.wrap(net, tasks, x[:2])      # out_features = 512
        """
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}.")
        tasks = list(tasks)
        if not tasks:
            raise ValueError("wrap needs at least one task (objects with .name and .out_dim, e.g. auxnb.Task).")
        if not callable(getattr(backbone, "blocks", None)):
            backbone = ChildBlocks(backbone)
        d = getattr(backbone, "out_features", None)
        if not isinstance(d, int):
            if example is None:
                raise ValueError(
                    f"{type(getattr(backbone, 'net', backbone)).__name__} does not declare out_features; pass an example "
                    "batch of inputs so it can be measured: MultiHeadModel.wrap(backbone, tasks, x[:2])."
                )
            d = _feature_size(backbone, example)
            backbone.out_features = d
        return cls.for_tasks(backbone, tasks, hidden=hidden, bank=bank)

    @property
    def task_names(self) -> list[str]:
        """Task names in head order."""
        return list(self.heads.keys())

    @property
    def out_features(self) -> int | None:
        """Feature size of the shared backbone (``None`` if the backbone does not declare it)."""
        return getattr(self.backbone, "out_features", None)

    def _select(self, tasks: str | Iterable[str] | None) -> list[str]:
        if tasks is None:
            return self.task_names
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        heads = self.heads
        unknown = [name for name in names if name not in heads]
        if unknown:
            raise KeyError(f"Unknown task(s) {unknown}; this model has heads for {self.task_names}.")
        return names

    def head_forward(
        self, features: torch.Tensor, tasks: str | Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Apply the heads of ``tasks`` (all when None) to precomputed ``features``.

        Feature-space methods (F-MixUp, DTG-AuxL's generated samples, paper §3.2) build features
        themselves and need the heads without the backbone.
        """
        out = HeadOutputs()
        names = self._select(tasks)
        banked = self._bank_forward(features, names, out.joint)
        batched = self._batched_linear(features, [n for n in names if n not in banked])
        for name in names:
            if name in banked:
                out[name] = banked[name]
                continue
            if name in batched:
                out[name] = batched[name]
                continue
            head = self.heads[name]
            weight = next(head.parameters(), None)
            # features made outside autocast from half-precision backbone outputs (DTG, F-MixUp under
            # amp) meet float heads: bring them to the head's precision (under autocast the op recasts)
            x = features.to(weight.dtype) if weight is not None and features.is_floating_point() and features.dtype != weight.dtype else features
            out[name] = head(x)
        return out

    #: With at least this many plain ``nn.Linear`` heads requested together, they are evaluated as
    #: one matrix product (their weights concatenated) and one split: a few autograd nodes instead
    #: of one per head (CUB's 312 attribute heads). Same numbers up to float rounding of the product.
    BATCH_HEADS = 8

    def _bank_forward(self, features: torch.Tensor, names: list[str], joints: dict) -> dict[str, torch.Tensor]:
        """The requested banked heads: one product per bank (into `joints`: names -> ``[B, K*out]``),
        split into each head's ``[B, out]``."""
        banks = self._modules.get("head_banks")
        if banks is None or features.dim() != 2:
            return {}
        out: dict[str, torch.Tensor] = {}
        for bank in banks.values():
            index = bank._index
            wanted = [n for n in names if n in index]
            if not wanted:
                continue
            joint = bank(features, [index[n] for n in wanted])
            joints[tuple(wanted)] = joint
            out.update(zip(wanted, joint.split(bank.out_features, dim=1)))
        return out

    def _batched_linear(self, features: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        linear = [n for n in names if type(self.heads[n]) is nn.Linear]
        if len(linear) < self.BATCH_HEADS or features.dim() != 2:
            return {}
        heads = [self.heads[n] for n in linear]
        w0 = heads[0].weight
        if any(h.weight.dtype != w0.dtype or h.weight.device != w0.device or h.bias is None for h in heads):
            return {}
        x = features.to(w0.dtype) if features.is_floating_point() and features.dtype != w0.dtype else features
        # the weights joined by `auxnb._ops.cat`: the same values as torch.cat, but a second-order
        # graph (the upper step's Hessian-vector products) holds one split node for the K heads
        # instead of one slice per head, each of which fills a zero tensor of all the heads' size
        weight = _ops.cat([h.weight for h in heads])
        bias = _ops.cat([h.bias for h in heads])
        parts = torch.nn.functional.linear(x, weight, bias).split([h.out_features for h in heads], dim=1)
        return dict(zip(linear, parts))

    def forward(
        self, x: torch.Tensor, tasks: str | Iterable[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(features, {task: output})`` for the requested tasks (all when None).

        Raises:
            KeyError: a requested task has no head; the message lists the valid names.
        """
        names = self._select(tasks)  # fail before paying for the backbone
        features = self.backbone(x)
        return features, self.head_forward(features, names)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Block-L modules: the backbone's blocks (input to output), then ``"head:<task>"`` per head.

        A banked head's block is its `BankHead` view, which owns no parameter but names its rows of
        the bank (``param_rows()``): `auxnb.partition.by_block` gives each banked head its own group.

        Raises:
            TypeError: the backbone does not define ``blocks()``.
        """
        backbone_blocks = getattr(self.backbone, "blocks", None)
        if not callable(backbone_blocks):
            raise TypeError(
                f"Backbone {type(self.backbone).__name__} defines no blocks(); give it a method "
                "blocks() -> [(name, module), ...] covering its parameters, or partition with "
                "auxnb.partition.by_parameter, whole_model or custom instead."
            )
        return list(backbone_blocks()) + [(f"{HEAD_PREFIX}{name}", head) for name, head in self.heads.items()]
