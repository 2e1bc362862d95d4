"""Tests for auxnb.partition: every trainable parameter in exactly one group, and clear errors otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from auxnb.models import AutoInt, ConvNet4, MultiHeadModel, ResNet18, make_head
from auxnb.partition import ParamGroup, Partition, by_block, by_parameter, custom, whole_model


def _heads(in_features: int) -> dict[str, nn.Module]:
    return {"main": make_head(in_features, 3), "aux": make_head(in_features, 1, hidden=4)}


def _wrap(backbone: nn.Module) -> MultiHeadModel:
    return MultiHeadModel(backbone, _heads(backbone.out_features))


MODELS = {
    "convnet4": lambda: _wrap(ConvNet4(in_channels=1, input_size=8)),
    "resnet18": lambda: _wrap(ResNet18()),
    "resnet18-cifar": lambda: _wrap(ResNet18(cifar_stem=True)),
    "autoint": lambda: _wrap(AutoInt([5, 3, 7])),
}
CONSTRUCTORS = {"by_parameter": by_parameter, "by_block": by_block, "whole_model": whole_model}


def _assert_covers_once(partition: Partition, model: nn.Module) -> None:
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    ids = [id(p) for p in partition.params]
    assert len(ids) == len(set(ids)) == len(trainable)  # nothing twice, nothing missing
    assert set(ids) == set(trainable)
    assert partition.numel == sum(partition.sizes) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert [trainable[id(p)] for p in partition.params] == list(partition.param_names)
    assert all(len(group.params) > 0 for group in partition)


@pytest.mark.parametrize("constructor", list(CONSTRUCTORS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_partition_covers_every_parameter_exactly_once(kind: str, constructor: str) -> None:
    model = MODELS[kind]()
    _assert_covers_once(CONSTRUCTORS[constructor](model), model)


def test_by_block_of_resnet18_is_stem_four_stages_then_heads() -> None:
    for cifar_stem in (False, True):
        partition = by_block(_wrap(ResNet18(cifar_stem=cifar_stem)))
        assert partition.names == ("stem", "layer1", "layer2", "layer3", "layer4", "head:main", "head:aux")
        assert partition["stem"].names == (
            "backbone.conv1.weight",
            "backbone.bn1.weight",
            "backbone.bn1.bias",
        )
        assert partition.kind == "block"


def test_by_block_of_autoint_is_embedding_then_interacting_blocks_then_heads() -> None:
    partition = by_block(_wrap(AutoInt([5, 3])))
    assert partition.names == ("embedding", "block1", "block2", "block3", "block4", "head:main", "head:aux")


def test_by_parameter_has_one_group_per_named_parameter_in_model_order() -> None:
    model = _wrap(ConvNet4(in_channels=1, input_size=8))
    partition = by_parameter(model)
    names = [name for name, _ in model.named_parameters()]
    assert list(partition.names) == names
    assert all(group.names == (group.name,) for group in partition)


def test_whole_model_is_one_group_named_model() -> None:
    model = _wrap(ConvNet4(in_channels=1, input_size=8))
    partition = whole_model(model)
    assert partition.names == ("model",) and len(partition) == 1


def test_by_block_of_a_module_without_blocks_suggests_the_other_constructors() -> None:
    with pytest.raises(TypeError, match="by_parameter"):
        by_block(nn.Sequential(nn.Linear(2, 2)))


def test_by_block_leaves_frozen_parameters_and_fully_frozen_blocks_out() -> None:
    model = _wrap(ResNet18(cifar_stem=True))
    model.backbone.conv1.requires_grad_(False)
    model.backbone.bn1.requires_grad_(False)
    model.backbone.layer1[0].conv1.requires_grad_(False)
    partition = by_block(model)
    assert partition.names[0] == "layer1"
    assert "backbone.layer1.0.conv1.weight" not in partition.param_names
    _assert_covers_once(partition, model)


# --- custom -------------------------------------------------------------------------------
def _small() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4), nn.Linear(4, 1))


def test_custom_groups_from_modules_prefixes_and_dicts() -> None:
    model = _small()
    by_modules = custom(model, [model[0], model[2], model[3]])
    assert by_modules.names == ("0", "2", "3")
    by_prefix = custom(model, ["0", "2", "3"])
    assert by_prefix.names == ("0", "2", "3") and by_prefix.sizes == (9, 16, 5)
    by_dict = custom(model, {"bottom": [model[3], "0"], "middle": model[2]})
    assert by_dict.names == ("bottom", "middle")
    # Within a group parameters follow model.named_parameters(), whatever order the spec gives.
    assert by_dict["bottom"].names == ("0.weight", "0.bias", "3.weight", "3.bias")
    _assert_covers_once(by_dict, model)
    assert custom(model, [model]).names == ("model",)


def test_custom_prefix_matches_whole_name_components_only() -> None:
    model = nn.ModuleDict({"layer1": nn.Linear(2, 2), "layer10": nn.Linear(2, 2)})
    partition = custom(model, ["layer1", "layer10"])
    assert partition["layer1"].names == ("layer1.weight", "layer1.bias")


def test_custom_partition_missing_a_parameter_names_it() -> None:
    model = _small()
    with pytest.raises(ValueError, match=r"'3\.weight', '3\.bias'.*in no group"):
        custom(model, [model[0], model[2]])


def test_custom_partition_with_a_parameter_in_two_groups_names_it() -> None:
    model = _small()
    with pytest.raises(ValueError, match=r"'2\.weight', '2\.bias' are in groups 'a' and 'b'"):
        custom(model, {"a": [model[0], model[2]], "b": [model[2], model[3]]})


def test_custom_partition_with_a_frozen_parameter_names_it() -> None:
    model = _small()
    model[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"frozen.*'2\.bias'"):
        custom(model, [model[0], model[2], model[3]])
    partition = custom(model, [model[0], model[2], model[3]], skip_frozen=True)
    assert partition["2"].names == ("2.weight",)
    _assert_covers_once(partition, model)


def test_partition_rejects_foreign_parameters_and_empty_groups() -> None:
    model = _small()
    stranger = nn.Parameter(torch.zeros(7, 5))
    with pytest.raises(ValueError, match=r"not parameters of the model \(shapes \(7, 5\)\)"):
        Partition(model, [("all", [*model.parameters(), stranger])])
    with pytest.raises(ValueError, match="'empty' is empty"):
        custom(model, {"all": model, "empty": []})
    with pytest.raises(ValueError, match="not a submodule"):
        custom(model, [model, nn.Linear(1, 1)])
    with pytest.raises(ValueError, match=r"prefix '9' matches no parameter"):
        custom(model, [model, "9"])
    with pytest.raises(ValueError, match="Two groups are named"):
        Partition(model, [("x", model[0].parameters()), ("x", model[2].parameters())])


def test_tied_parameters_count_once() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert by_parameter(model).names == ("0.weight", "0.bias")
    assert whole_model(model).numel == 12
    assert custom(model, [model[0]]).sizes == (12,)
    with pytest.raises(ValueError, match=r"'0\.weight', '0\.bias' are in groups '0' and '2'"):
        custom(model, ["0", "2"])  # the same tensors reached under two names


# --- the Partition API ------------------------------------------------------------------
def test_partition_indexing_lookup_and_slices_agree() -> None:
    model = _wrap(ConvNet4(in_channels=1, input_size=8))
    partition = by_block(model)
    assert len(partition) == 6
    assert partition[0] is partition["conv1"] and partition[-1].name == "head:aux"
    assert [g.name for g in partition] == list(partition.names)
    for index, (group, piece) in enumerate(zip(partition, partition.slices())):
        assert partition.params[piece] == group.params
        assert partition.param_names[piece] == group.names
        assert all(partition.group_of(p) == index for p in group.params)
        assert all(partition.group_of(n) == index for n in group.names)
        assert partition.sizes[index] == sum(p.numel() for p in group.params) == group.numel
    assert partition.group_of(model.heads["main"].weight) == 4
    with pytest.raises(KeyError, match="No group named 'conv9'"):
        partition["conv9"]
    with pytest.raises(KeyError):
        partition.group_of(nn.Parameter(torch.zeros(1)))
    with pytest.raises(KeyError):
        partition.group_of("backbone.conv9.weight")


def test_partition_repr_is_compact() -> None:
    text = repr(by_parameter(_wrap(ResNet18(cifar_stem=True))))
    assert text.startswith("Partition(parameter, 66 groups: ") and len(text) < 250
    assert "stem[" in repr(by_block(_wrap(ResNet18(cifar_stem=True))))


def test_param_group_compares_by_names_not_tensor_values() -> None:
    model = _small()
    first, second = custom(model, [model])[0], custom(model, [model])[0]
    assert first == second and hash(first) == hash(second)  # no elementwise tensor comparison
    assert first != ParamGroup("model", ("0.weight",), (model[0].weight,))
    assert "tensors" in repr(first)
