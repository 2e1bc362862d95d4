"""Partitions of a model's trainable parameters into named groups: MAOAL's "modules".

A `Partition` covers every trainable parameter exactly once, in a fixed order; anything else
(a missing, repeated, frozen or foreign parameter, an empty group) is an error, never silently fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence, Union

import torch
from torch import nn

__all__ = ["ParamGroup", "ParamRow", "Partition", "by_parameter", "by_block", "whole_model", "custom"]


class ParamRow(NamedTuple):
    """Row `row` (along dim 0) of parameter `param`: one head's slice of a batched head parameter
    (`auxnb.models.LinearBank`), which a partition may put in a group of its own."""

    param: torch.Tensor
    row: int


#: One item of a `custom` spec: a submodule, a parameter-name prefix, a parameter, or a `ParamRow`.
SpecItem = Union[nn.Module, str, nn.Parameter, ParamRow]

_SHOW = 8  # names shown in an error message before "... and N more"


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    return shown + (f", ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _compact(n: int) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


@dataclass(frozen=True)
class ParamGroup:
    """One named group ("module" in MAOAL §4.3) of parameters.

    Args:
        name: the group's name (block name, parameter name, prefix, ...), shown in plots.
        names: the parameters' names as in ``model.named_parameters()``, in model order; a row
            of a batched parameter is named ``"<parameter>[<row>]"``.
        params: the parameters themselves, aligned with ``names``.
        rows: aligned with ``params``: None where the group holds the whole parameter, else the
            row (index along dim 0) it holds (a batched head parameter split head by head).
    """

    name: str
    names: tuple[str, ...]
    # Tensors compare elementwise: leave them out of ==, hash and repr.
    params: tuple[nn.Parameter, ...] = field(compare=False, repr=False)
    rows: tuple[int | None, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.rows is None:
            object.__setattr__(self, "rows", (None,) * len(self.params))

    @property
    def numel(self) -> int:
        """Number of scalar values in the group."""
        return sum(p.numel() if r is None else p[r].numel() for p, r in zip(self.params, self.rows))

    def __repr__(self) -> str:
        return f"ParamGroup({self.name!r}, {len(self.params)} tensors, {self.numel} values)"


class Partition(Sequence[ParamGroup]):
    """An ordered list of named parameter groups covering a model's trainable parameters once.

    MAOAL (§4.3, Table 4) learns one importance per (auxiliary loss, module); the module
    granularity is a partition: Parameter-L (`by_parameter`), Block-L (`by_block`), Model-L
    (`whole_model`), or any grouping (`custom`). Methods index their per-module
    hyper-parameters by group position; plots label them with `names`.

    Args:
        model: the model whose trainable (``requires_grad``) parameters must be covered.
        groups: `ParamGroup` objects or ``(name, parameters)`` pairs, in the order wanted.
            Within a group, parameters are re-ordered as in ``model.named_parameters()`` and a
            parameter listed twice in the same group (e.g. tied weights) counts once. An item may
            be a `ParamRow` (one row of a batched parameter): such a parameter is then covered row
            by row, every row in exactly one group (`groups_of` gives each row's group).
        kind: a label for reports (``"parameter"``, ``"block"``, ``"model"``, ``"custom"``).

    Raises:
        ValueError: a trainable parameter is in no group or in two groups, a group holds a
            frozen parameter or one that is not the model's, a group is empty, or two groups
            share a name. The message names the parameters and the fix.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> part = custom(model, {"hidden": "0", "out": model[2]})
        >>> part.names, part.sizes, part.group_of("2.bias")
        (('hidden', 'out'), (9, 4), 1)
        >>> part.param_names[part.slices()[1]]
        ('2.weight', '2.bias')
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Iterable[ParamGroup | tuple[str, Iterable[torch.Tensor]]],
        kind: str = "custom",
    ) -> None:
        order: dict[int, int] = {}
        name_of: dict[int, str] = {}
        for position, (name, p) in enumerate(model.named_parameters()):  # tied weights: first name
            order[id(p)] = position
            name_of[id(p)] = name

        problems: list[str] = []
        owner: dict[object, str] = {}  # id(parameter), or (id(parameter), row), -> name of its group
        row_owned: dict[int, set[int]] = {}  # id(parameter) -> rows given to some group
        seen_names: set[str] = set()
        collected: list[tuple[str, list[tuple[torch.Tensor, int | None]]]] = []
        for entry in groups:
            if isinstance(entry, ParamGroup):
                group_name, items = entry.name, [ParamRow(p, r) if r is not None else p for p, r in zip(entry.params, entry.rows)]
            else:
                group_name, items = entry
            if not isinstance(group_name, str) or not group_name:
                raise ValueError(f"Group names must be non-empty strings, got {group_name!r}.")
            if group_name in seen_names:
                raise ValueError(f"Two groups are named {group_name!r}; give every group its own name.")
            seen_names.add(group_name)
            unique: dict[object, tuple[torch.Tensor, int | None]] = {}
            for item in items:
                p, row = (item.param, int(item.row)) if isinstance(item, ParamRow) else (item, None)
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"Group {group_name!r} holds a {type(p).__name__}, not a parameter.")
                if row is not None and not (p.dim() >= 1 and 0 <= row < p.shape[0]):
                    raise ValueError(f"Group {group_name!r} holds row {row} of a parameter of shape {tuple(p.shape)}: "
                                     "no such row along dim 0.")
                unique.setdefault(id(p) if row is None else (id(p), row), (p, row))
            foreign = [p for key, (p, _) in unique.items() if _pid(key) not in order]
            frozen = [_label(name_of, key) for key, (p, _) in unique.items() if _pid(key) in order and not p.requires_grad]
            twice = [key for key in unique if _clash(key, owner, row_owned)]
            if foreign:
                shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:_SHOW])
                problems.append(
                    f"group {group_name!r} holds {len(foreign)} tensor(s) that are not parameters of the "
                    f"model (shapes {shapes}); build the partition from the model being trained"
                )
            if frozen:
                problems.append(
                    f"group {group_name!r} holds frozen parameter(s) (requires_grad=False) {_listing(frozen)}; "
                    "a partition holds only trainable parameters: leave them out "
                    "(custom(..., skip_frozen=True) does) or unfreeze them before partitioning"
                )
            clashes = {key: _clash(key, owner, row_owned) for key in twice}
            for other in dict.fromkeys(clashes.values()):  # one message per pair of groups
                shared = [_label(name_of, key) for key in twice if clashes[key] == other]
                problems.append(
                    f"parameter(s) {_listing(shared)} are in groups {other!r} and {group_name!r}; every "
                    "parameter belongs to exactly one group: remove them from one of the two"
                )
            kept = [(key, p, row) for key, (p, row) in unique.items()
                    if _pid(key) in order and p.requires_grad and key not in clashes]
            for key, p, row in kept:
                owner[key] = group_name
                if row is not None:
                    row_owned.setdefault(id(p), set()).add(row)
            if not unique:
                problems.append(f"group {group_name!r} is empty; drop it or give it parameters")
            collected.append((group_name, sorted(((p, row) for _, p, row in kept),
                                                 key=lambda pr: (order[id(pr[0])], -1 if pr[1] is None else pr[1]))))

        missing = []
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in owner:
                continue
            rows = row_owned.get(id(p))
            if rows is None:
                missing.append(name)
            else:
                missing += [f"{name}[{r}]" for r in range(p.shape[0]) if r not in rows]
        if missing:
            problems.append(
                f"trainable parameter(s) {_listing(missing)} are in no group; add them to a group, "
                "or freeze them (p.requires_grad_(False)) before partitioning"
            )
        if not collected and not problems:
            problems.append("the partition has no groups (does the model have trainable parameters?)")
        if problems:
            raise ValueError(
                f"Invalid partition of {type(model).__name__}:\n" + "\n".join(f"  - {p}." for p in problems)
            )

        self.kind = kind
        self._groups = tuple(
            ParamGroup(name, tuple(name_of[id(p)] if r is None else f"{name_of[id(p)]}[{r}]" for p, r in entries),
                       tuple(p for p, _ in entries), tuple(r for _, r in entries))
            for name, entries in collected
        )
        self._index = {group.name: i for i, group in enumerate(self._groups)}
        self._group_of_param: dict[int, int] = {}
        self._row_groups: dict[int, torch.Tensor] = {}  # id(parameter split by rows) -> group of each row
        for i, group in enumerate(self._groups):
            for p, r in zip(group.params, group.rows):
                if r is None:
                    self._group_of_param[id(p)] = i
                else:
                    self._row_groups.setdefault(id(p), torch.full((p.shape[0],), -1, dtype=torch.long))[r] = i
        self._group_of_name = {n: i for i, group in enumerate(self._groups) for n in group.names}

    # --- sequence of groups -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[ParamGroup]:
        return iter(self._groups)

    def __getitem__(self, key: int | str) -> ParamGroup:  # type: ignore[override]
        if isinstance(key, str):
            if key not in self._index:
                raise KeyError(f"No group named {key!r}; groups are {list(self._index)}.")
            return self._groups[self._index[key]]
        return self._groups[key]

    def __repr__(self) -> str:
        parts = [f"{g.name}[{_compact(g.numel)}]" for g in self._groups]
        if len(parts) > 6:
            parts = parts[:3] + [f"... {len(parts) - 5} more"] + parts[-2:]
        plural = "group" if len(self) == 1 else "groups"
        return f"Partition({self.kind}, {len(self)} {plural}: {', '.join(parts)})"

    # --- views --------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Group names, in order (labels for per-module plots)."""
        return tuple(g.name for g in self._groups)

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        """All parameters, group after group (the order of ``slices()``)."""
        return tuple(p for g in self._groups for p in g.params)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of `params`, aligned with it."""
        return tuple(n for g in self._groups for n in g.names)

    @property
    def rows(self) -> tuple[int | None, ...]:
        """Aligned with `params`: None for a whole parameter, else the row the entry stands for."""
        return tuple(r for g in self._groups for r in g.rows)

    def groups_of(self, param: torch.Tensor) -> int | torch.Tensor:
        """The group of a parameter (`group_of`), or for a parameter split by rows (a batched head
        parameter, `ParamRow`) a long tensor ``[param.shape[0]]`` of each row's group."""
        if id(param) in self._row_groups:
            return self._row_groups[id(param)].clone()
        return self.group_of(param)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of scalar values per group."""
        return tuple(g.numel for g in self._groups)

    @property
    def numel(self) -> int:
        """Number of scalar values in all groups (= trainable values of the model)."""
        return sum(self.sizes)

    def slices(self) -> tuple[slice, ...]:
        """For each group, the slice of `params` (and of any tuple aligned with it) it occupies.

        Methods that compute one gradient tuple over ``partition.params`` use these slices to
        weight each group's gradients (MAOAL Eq. 5).
        """
        out, start = [], 0
        for g in self._groups:
            out.append(slice(start, start + len(g.params)))
            start += len(g.params)
        return tuple(out)

    def group_of(self, param_or_name: torch.Tensor | str) -> int:
        """Index of the group holding a parameter (given itself or by its model name)."""
        if isinstance(param_or_name, str):
            if param_or_name not in self._group_of_name:
                raise KeyError(
                    f"No trainable parameter named {param_or_name!r} in this partition "
                    f"(e.g. {_listing(self.param_names[:3])})."
                )
            return self._group_of_name[param_or_name]
        if id(param_or_name) in self._row_groups:
            raise KeyError(
                f"Parameter of shape {tuple(param_or_name.shape)} is split by rows across groups; "
                "use partition.groups_of(param) for each row's group."
            )
        if id(param_or_name) not in self._group_of_param:
            raise KeyError(f"Parameter of shape {tuple(param_or_name.shape)} is not in this partition.")
        return self._group_of_param[id(param_or_name)]


def _pid(key: object) -> int:
    return key[0] if isinstance(key, tuple) else key  # type: ignore[index,return-value]


def _label(name_of: Mapping[int, str], key: object) -> str:
    if isinstance(key, tuple):
        return f"{name_of.get(key[0], 'parameter')}[{key[1]}]"
    return name_of.get(key, "parameter")  # type: ignore[arg-type]


def _clash(key: object, owner: Mapping[object, str], row_owned: Mapping[int, set[int]]) -> str | None:
    """The group already holding `key` (a parameter, or one of its rows), or None."""
    if key in owner:
        return owner[key]
    if isinstance(key, tuple):  # a row of a parameter some group holds whole
        return owner.get(key[0])
    if key in row_owned:  # a whole parameter some of whose rows are in groups already
        return next(owner[(key, r)] for r in sorted(row_owned[key]))  # type: ignore[index]
    return None


def _bank_rows(model: nn.Module) -> dict[int, list[tuple[str, ParamRow]]]:
    """id(batched head parameter) -> (per-head parameter name, its row), for `LinearBank` heads."""
    heads = getattr(model, "heads", None)
    out: dict[int, list[tuple[str, ParamRow]]] = {}
    if heads is None or not hasattr(heads, "items"):
        return out
    for name, head in heads.items():
        param_rows = getattr(head, "param_rows", None)
        if callable(param_rows):
            for (p, row), kind in zip(param_rows(), ("weight", "bias")):
                out.setdefault(id(p), []).append((f"heads.{name}.{kind}", ParamRow(p, row)))
    return out


def by_parameter(model: nn.Module) -> Partition:
    """Parameter-L: one group per trainable entry of ``model.named_parameters()``.

    MAOAL supplement §2.2: "for the Parameter-L variant, we regard each item in
    model.named_parameters() in PyTorch as a module."
    """
    banked = _bank_rows(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not banked:
        return Partition(model, [(name, [p]) for name, p in named], kind="parameter")
    # a model with batched heads: its groups are the per-head model's, in its order (the heads'
    # parameters after the rest, head by head in task order; a banked head's weight and bias rows
    # named heads.<task>.weight / .bias)
    head_groups: list[tuple[str, list]] = []
    for head in model.heads.keys():
        for head_name, row in (entry for entries in banked.values() for entry in entries):
            if head_name.split(".")[1] == head:
                head_groups.append((head_name, [row]))
        head_groups += [(name, [p]) for name, p in named if name.startswith(f"heads.{head}.")]
    placed = {id(p) for _, items in head_groups for p in items}
    rest = [(name, [p]) for name, p in named if id(p) not in placed and id(p) not in banked]
    return Partition(model, rest + head_groups, kind="parameter")


def by_block(model: nn.Module) -> Partition:
    """Block-L: one group per entry of ``model.blocks()`` (backbone blocks, then heads; MAOAL §4.3).

    Frozen parameters are left out and a block with no trainable parameter is skipped, so
    fine-tuning with a frozen stem still gives a valid partition.

    Raises:
        TypeError: the model has no ``blocks()`` method.
    """
    blocks = getattr(model, "blocks", None)
    if not callable(blocks):
        raise TypeError(
            f"{type(model).__name__} has no blocks() method, so Block-L is undefined for it; use "
            "by_parameter(model), whole_model(model) or custom(model, [submodules or name prefixes]), "
            "or wrap it in auxnb.models.MultiHeadModel with a backbone that defines blocks()."
        )
    groups = []
    for name, module in blocks():
        if not isinstance(module, nn.Module):
            raise TypeError(f"blocks() of {type(model).__name__} gave {type(module).__name__} for {name!r}.")
        params: list = [p for p in module.parameters() if p.requires_grad]
        param_rows = getattr(module, "param_rows", None)  # a banked head (`BankHead`): its rows of the bank
        if callable(param_rows):
            params += [ParamRow(p, r) for p, r in param_rows() if p.requires_grad]
        if params:
            groups.append((name, params))
    return Partition(model, groups, kind="block")


def whole_model(model: nn.Module) -> Partition:
    """Model-L: every trainable parameter in one group named "model" (MAOAL Table 4)."""
    return Partition(model, [("model", [p for p in model.parameters() if p.requires_grad])], kind="model")


def custom(
    model: nn.Module,
    spec: Sequence[SpecItem] | Mapping[str, SpecItem | Sequence[SpecItem]],
    skip_frozen: bool = False,
) -> Partition:
    """A partition from submodules, parameter-name prefixes or parameters.

    Args:
        model: the model to partition.
        spec: a list of items, one group each, named by the submodule's qualified name
            (``"model"`` for the model itself) or the prefix; or a dict group name → item or
            list of items. A prefix ``"backbone.layer1"`` matches ``"backbone.layer1"`` and
            every name under ``"backbone.layer1."``. A banked head (``model.heads[name]`` of a
            model with a `LinearBank`) gives its rows of the bank, as does a `ParamRow`.
        skip_frozen: leave frozen parameters out of the groups instead of raising.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> custom(model, [model[0], "1"]).names
        ('0', '1')
    """
    module_names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    param_names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    all_named = list(model.named_parameters(remove_duplicate=False))

    def resolve(item: SpecItem) -> tuple[str, list]:
        if isinstance(item, ParamRow):
            return f"{param_names.get(id(item.param), 'parameter')}[{item.row}]", [item]
        if isinstance(item, nn.Parameter):
            return param_names.get(id(item), "parameter"), [item]
        if isinstance(item, nn.Module) and callable(getattr(item, "param_rows", None)) and id(item) not in module_names:
            return f"head:{getattr(item, 'name', 'head')}", [ParamRow(p, r) for p, r in item.param_rows()]
        if isinstance(item, nn.Module):
            if id(item) not in module_names:
                raise ValueError(
                    f"custom partition: a {type(item).__name__} in the spec is not a submodule of the "
                    "model; pass the model's own submodules, name prefixes, or a dict name -> items."
                )
            return module_names[id(item)] or "model", list(item.parameters())
        if isinstance(item, str):
            matched = [p for name, p in all_named if name == item or name.startswith(item + ".")]
            if not matched:
                tops = sorted({name.split(".")[0] for name, _ in all_named})
                raise ValueError(
                    f"custom partition: prefix {item!r} matches no parameter name; "
                    f"top-level names are {tops} (see model.named_parameters())."
                )
            return item, matched
        raise TypeError(f"custom partition: spec items are modules, name prefixes or parameters, got {item!r}.")

    groups: list[tuple[str, list[torch.Tensor]]] = []
    if isinstance(spec, Mapping):
        for group_name, items in spec.items():
            items = [items] if isinstance(items, (nn.Module, str, nn.Parameter, ParamRow)) else list(items)
            groups.append((group_name, [p for item in items for p in resolve(item)[1]]))
    else:
        groups = [resolve(item) for item in spec]
    if skip_frozen:
        groups = [(name, [p for p in params if (p.param if isinstance(p, ParamRow) else p).requires_grad])
                  for name, params in groups]
        groups = [(name, params) for name, params in groups if params]
    return Partition(model, groups, kind="custom")
