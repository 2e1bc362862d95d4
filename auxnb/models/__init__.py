"""Backbones that declare their blocks, task heads, and the hard-parameter-sharing `MultiHeadModel`.

Models only map inputs to features and outputs: they never compute losses, never download
weights and never choose a device.
"""

from __future__ import annotations

from auxnb.models.autoint import AutoInt, InteractingLayer
from auxnb.models.convnet import ConvNet4
from auxnb.models.mlp import MLP
from auxnb.models.multihead import Backbone, BankHead, ChildBlocks, HeadDict, LinearBank, MultiHeadModel, make_head
from auxnb.models.resnet import ResNet, ResNet18, ResNet50

__all__ = [
    "AutoInt",
    "Backbone",
    "BankHead",
    "ChildBlocks",
    "ConvNet4",
    "HeadDict",
    "InteractingLayer",
    "LinearBank",
    "MLP",
    "MultiHeadModel",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "make_head",
]
