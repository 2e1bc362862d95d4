"""Tests for auxnb.models: backbone structure from the papers, block coverage, heads, MultiHeadModel."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from auxnb.models import MLP, AutoInt, ConvNet4, MultiHeadModel, ResNet18, ResNet50, make_head
from auxnb.tasks import Task


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


BACKBONES = {
    "convnet4-8x8": lambda: ConvNet4(in_channels=1, input_size=8),
    "convnet4-32x32": lambda: ConvNet4(),
    "resnet18": lambda: ResNet18(),
    "resnet18-cifar": lambda: ResNet18(cifar_stem=True),
    "resnet50": lambda: ResNet50(),
    "autoint": lambda: AutoInt([5, 3, 7]),
    "mlp": lambda: MLP(64),
}


# --- the backbone contract --------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_blocks_hold_every_backbone_parameter_exactly_once(kind: str) -> None:
    backbone = BACKBONES[kind]()
    from_blocks = [p for _, block in backbone.blocks() for p in block.parameters()]
    assert len({id(p) for p in from_blocks}) == len(from_blocks)  # no parameter in two blocks
    assert {id(p) for p in from_blocks} == {id(p) for p in backbone.parameters()}
    assert sum(p.numel() for p in from_blocks) == sum(p.numel() for p in backbone.parameters())
    names = [name for name, _ in backbone.blocks()]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: ConvNet4(in_channels=1, input_size=8), torch.randn(3, 1, 8, 8)),
        (
            lambda: AutoInt([5, 3, 7], embed_dim=8, num_blocks=2, num_heads=2),
            torch.tensor([[4, 0, 6], [1, 2, 0], [0, 1, 3]]),
        ),
        (lambda: MLP(64, hidden=(8, 8)), torch.randn(3, 64)),
    ],
    ids=["convnet4", "autoint", "mlp"],
)
def test_backbone_supports_double_backward_for_bilevel_methods(make, x: torch.Tensor) -> None:
    # Implicit hypergradients differentiate gradients again (create_graph=True).
    backbone = make()
    params = list(backbone.parameters())
    loss = backbone(x).pow(2).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params, allow_unused=True)
    assert any(s is not None and s.abs().sum() > 0 for s in second)


# --- ConvNet4 (MAOAL supplement §2.3) ---------------------------------------------------
def test_convnet4_has_four_conv3x3_stride1_bn_relu_layers_of_32_channels_pooled_after_2_and_4() -> None:
    net = ConvNet4()
    blocks = net.blocks()
    assert [name for name, _ in blocks] == ["conv1", "conv2", "conv3", "conv4"]
    for index, (_, block) in enumerate(blocks, start=1):
        kinds = [type(m) for m in block]
        expected = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] + ([nn.MaxPool2d] if index in (2, 4) else [])
        assert kinds == expected
        conv, bn = block[0], block[1]
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        assert conv.out_channels == 32 and bn.num_features == 32
        assert conv.in_channels == (3 if index == 1 else 32)
        if index in (2, 4):
            assert block[3].kernel_size == 2 and block[3].stride == 2
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 4


@pytest.mark.parametrize("size, in_channels, maps", [(32, 3, [32, 16, 16, 8]), (8, 1, [8, 4, 4, 2])])
def test_convnet4_halves_spatial_size_after_layers_2_and_4(size: int, in_channels: int, maps: list[int]) -> None:
    net = ConvNet4(in_channels=in_channels, input_size=size)
    x = torch.randn(2, in_channels, size, size)
    for (_, block), expected in zip(net.blocks(), maps):
        x = block(x)
        assert tuple(x.shape) == (2, 32, expected, expected)
    features = net(torch.randn(2, in_channels, size, size))
    assert features.shape == (2, 32 * maps[-1] ** 2) and net.out_features == 32 * maps[-1] ** 2


def test_convnet4_global_pool_gives_channel_features_for_any_image_size() -> None:
    net = ConvNet4(in_channels=1, global_pool=True)
    assert net.out_features == 32
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 32)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 32)


def test_convnet4_rejects_images_of_another_size_than_built_for() -> None:
    net = ConvNet4(in_channels=1, input_size=28)
    with pytest.raises(ValueError, match="input_size"):
        net(torch.randn(2, 1, 8, 8))


def test_convnet4_rejects_pool_index_outside_its_four_layers() -> None:
    with pytest.raises(ValueError, match="pool_after"):
        ConvNet4(pool_after=(2, 5))


# --- ResNet -----------------------------------------------------------------------------
def test_resnet_blocks_are_stem_then_four_stages() -> None:
    net = ResNet18()
    names = [name for name, _ in net.blocks()]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    stem = dict(net.blocks())["stem"]
    assert {id(p) for p in stem.parameters()} == {id(p) for p in [*net.conv1.parameters(), *net.bn1.parameters()]}


def test_resnet_cifar_stem_is_3x3_stride1_conv_without_maxpool() -> None:
    cifar = ResNet18(cifar_stem=True)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and cifar.conv1.padding == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    imagenet = ResNet18()
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert any(isinstance(m, nn.MaxPool2d) for m in imagenet.modules())


def test_resnet_has_no_classifier_and_gives_512_or_2048_features() -> None:
    r18 = ResNet18(cifar_stem=True)
    assert not hasattr(r18, "fc")
    assert r18.out_features == 512 and r18(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    r50 = ResNet50()
    assert r50.out_features == 2048 and r50(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_resnet_in_channels_replaces_the_first_conv() -> None:
    net = ResNet18(cifar_stem=True, in_channels=1)
    assert net.conv1.in_channels == 1 and net(torch.randn(2, 1, 8, 8)).shape == (2, 512)


def test_resnet_pretrained_loads_a_torchvision_state_dict_and_ignores_fc(tmp_path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    net = ResNet18(pretrained=path)
    loaded = net.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith("fc."):
            assert key not in loaded
        else:
            assert torch.equal(loaded[key], value), key


def test_resnet_pretrained_cifar_stem_roundtrips_through_a_saved_state_dict(tmp_path) -> None:
    source = ResNet18(cifar_stem=True)
    path = tmp_path / "cifar.pt"
    torch.save(source.state_dict(), path)
    net = ResNet18(cifar_stem=True, pretrained=str(path))
    for (name, a), (_, b) in zip(source.state_dict().items(), net.state_dict().items()):
        assert torch.equal(a, b), name


def test_resnet_missing_pretrained_file_raises_file_not_found_naming_the_path(tmp_path) -> None:
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match="resnet18.pth"):
        ResNet18(pretrained=path)


def test_resnet_pretrained_weights_of_another_shape_raise_value_error(tmp_path) -> None:
    path = tmp_path / "imagenet_stem.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit"):
        ResNet18(cifar_stem=True, pretrained=path)  # 7×7 conv1 weights into a 3×3 stem


def test_resnet_never_downloads_weights(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("auxnb must never download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    ResNet18()


# --- AutoInt (MAOAL supplement §2.4) ----------------------------------------------------
def _ids(batch: int = 6) -> torch.Tensor:
    return torch.stack([torch.randint(0, d, (batch,)) for d in (5, 3, 7)], dim=1)


def test_autoint_defaults_follow_the_paper_4_blocks_4_heads_dim_16() -> None:
    net = AutoInt([5, 3, 7])
    assert [name for name, _ in net.blocks()] == ["embedding", "block1", "block2", "block3", "block4"]
    assert net.embedding.num_embeddings == 15 and net.embedding.embedding_dim == 16
    assert all(layer.num_heads == 4 and layer.head_dim == 4 for layer in net.interacting)
    assert net.out_features == 3 * 16 and net(_ids()).shape == (6, 48)


def test_autoint_gradient_reaches_every_parameter() -> None:
    net = AutoInt([5, 3, 7], embed_dim=8, num_blocks=2, num_heads=2)
    net(_ids(16)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_autoint_batch_permutation_permutes_outputs_without_cross_sample_leakage() -> None:
    net = AutoInt([5, 3, 7], embed_dim=8, num_blocks=2, num_heads=2)
    x = _ids(8)
    perm = torch.randperm(8)
    torch.testing.assert_close(net(x)[perm], net(x[perm]))
    # Changing one sample's ids leaves every other sample's features unchanged.
    y = x.clone()
    y[0] = (y[0] + 1) % torch.tensor([5, 3, 7])
    torch.testing.assert_close(net(x)[1:], net(y)[1:])


def test_autoint_field_offsets_give_each_field_its_own_embedding_rows() -> None:
    net = AutoInt([2, 2], embed_dim=4, num_blocks=1, num_heads=1)
    assert net.offsets.tolist() == [0, 2]
    # The same id in two fields must read two different rows.
    rows = net.embedding(torch.tensor([[1, 1]]) + net.offsets)
    torch.testing.assert_close(rows[0, 0], net.embedding.weight[1])
    torch.testing.assert_close(rows[0, 1], net.embedding.weight[3])


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[5, 0, 0]]), r"id 5 of field 0 .* out of range \[0, 5\)"),
        (torch.tensor([[0, 0, 7]]), r"id 7 of field 2 .* out of range \[0, 7\)"),
        (torch.tensor([[0, -1, 0]]), r"id -1 of field 1"),
        (torch.tensor([[0, 0]]), r"shape \[batch, 3\]"),
        (torch.tensor([[0.0, 0.0, 0.0]]), r"integer ids"),
    ],
)
def test_autoint_rejects_ids_out_of_range_or_of_wrong_shape(ids: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AutoInt([5, 3, 7])(ids)


def test_autoint_rejects_heads_that_do_not_divide_the_embedding() -> None:
    with pytest.raises(ValueError, match="divide"):
        AutoInt([5], embed_dim=10, num_heads=4)


# --- MLP and heads ----------------------------------------------------------------------
def test_mlp_flattens_inputs_and_has_one_block_per_hidden_layer() -> None:
    net = MLP(64, hidden=(32, 16), activation=nn.Tanh, dropout=0.1)
    assert [name for name, _ in net.blocks()] == ["layer1", "layer2"]
    assert isinstance(net.layer1[1], nn.Tanh) and isinstance(net.layer1[2], nn.Dropout)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 16) and net.out_features == 16
    with pytest.raises(ValueError, match="in_features"):
        net(torch.randn(3, 10))


def test_make_head_is_linear_or_two_layer_mlp() -> None:
    linear = make_head(8, 3)
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (8, 3)
    mlp = make_head(8, 1, hidden=16)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (8, 16, 1)


# --- MultiHeadModel ---------------------------------------------------------------------
TASKS = [
    Task("digit", "classification", 10, primary=True),
    Task("rotation", "classification", 4, stream="rotation"),
    Task("size", "regression"),
]


def _model(hidden: int | None = None) -> MultiHeadModel:
    return MultiHeadModel.for_tasks(ConvNet4(in_channels=1, input_size=8), TASKS, hidden=hidden).eval()


def test_for_tasks_builds_one_head_per_task_with_its_output_size() -> None:
    model = _model(hidden=16)
    assert model.task_names == ["digit", "rotation", "size"]
    assert isinstance(model.heads, nn.ModuleDict)
    assert [model.heads[t.name][2].out_features for t in TASKS] == [10, 4, 1]
    assert all(model.heads[t.name][0].in_features == 128 for t in TASKS)


def test_forward_with_a_subset_of_tasks_returns_only_those_heads() -> None:
    model = _model()
    x = torch.randn(2, 1, 8, 8)
    _, outputs = model(x, tasks=["rotation"])
    assert list(outputs) == ["rotation"] and outputs["rotation"].shape == (2, 4)
    _, single = model(x, tasks="size")
    assert list(single) == ["size"]
    _, every = model(x)
    assert list(every) == ["digit", "rotation", "size"]


def test_forward_outputs_equal_heads_applied_to_backbone_features_by_hand() -> None:
    model = _model(hidden=5)
    x = torch.randn(3, 1, 8, 8)
    features, outputs = model(x)
    expected_features = model.backbone(x)
    torch.testing.assert_close(features, expected_features)
    for name in model.task_names:
        torch.testing.assert_close(outputs[name], model.heads[name](expected_features))
    # head_forward on precomputed features (F-MixUp, DTG) gives the same outputs.
    torch.testing.assert_close(model.head_forward(features, ["digit"])["digit"], outputs["digit"])


def test_unknown_task_raises_key_error_listing_the_valid_tasks() -> None:
    model = _model()
    with pytest.raises(KeyError, match="digit.*rotation.*size"):
        model(torch.randn(2, 1, 8, 8), tasks=["colour"])
    with pytest.raises(KeyError, match="colour"):
        model.head_forward(torch.randn(2, 128), ["colour"])


def test_multihead_blocks_are_backbone_blocks_then_one_per_head() -> None:
    model = _model()
    names = [name for name, _ in model.blocks()]
    assert names == ["conv1", "conv2", "conv3", "conv4", "head:digit", "head:rotation", "head:size"]
    from_blocks = [p for _, block in model.blocks() for p in block.parameters()]
    assert len(from_blocks) == len(list(model.parameters()))
    assert {id(p) for p in from_blocks} == {id(p) for p in model.parameters()}


def test_multihead_blocks_need_a_backbone_that_declares_blocks() -> None:
    model = MultiHeadModel(nn.Linear(4, 8), {"y": make_head(8, 1)})
    assert model(torch.randn(2, 4))[1]["y"].shape == (2, 1)
    with pytest.raises(TypeError, match="blocks"):
        model.blocks()


def test_head_names_with_dots_are_rejected() -> None:
    with pytest.raises(ValueError, match="'a.b'"):
        MultiHeadModel(MLP(4, hidden=(8,)), {"a.b": make_head(8, 1)})


def test_models_hold_no_device_specific_code() -> None:
    import inspect

    import auxnb.models.autoint
    import auxnb.models.convnet
    import auxnb.models.mlp
    import auxnb.models.multihead
    import auxnb.models.resnet

    modules = (
        auxnb.models.autoint,
        auxnb.models.convnet,
        auxnb.models.mlp,
        auxnb.models.multihead,
        auxnb.models.resnet,
    )
    for module in modules:
        assert ".cuda(" not in inspect.getsource(module), module.__name__
