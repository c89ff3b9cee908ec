"""CIFAR ResNets and a compact GTSRB VGG whose forward-order block outputs are visible as modules.

Why this layout: the layer-wise detector hooks "layers" = block outputs (stem, every BasicBlock after the
residual add and ReLU, logits). Keeping each of them a named module (``stem``, ``layer1.0`` ... ``fc``)
lets forward hooks reach them without rewriting ``forward``. Inputs are float [0, 1] NCHW; the CIFAR
mean/std normalisation is the first module (``norm``) so callers never normalise themselves.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# per-channel mean/std of the 13,070 GTSRB training images of ../shared/data/gtsrb_32_sub13k.npz
GTSRB_MEAN = (0.3393, 0.3111, 0.3200)
GTSRB_STD = (0.2747, 0.2634, 0.2697)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, stored as buffers so it moves with the model and is in the state_dict."""

    def __init__(self, mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """ResNet basic block; its output (after add + ReLU) is one detector layer, so the ReLU ends forward."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + self.shortcut(x))


def _add_head_and_init(model: nn.Module, features: int, num_classes: int) -> None:
    """Both architectures end the same way: global average pool, flatten, one linear layer (`pool`, `fc`, the
    names layerguard's default window and the saved weights use); convolutions get He initialisation."""
    model.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.fc = nn.Linear(features, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class CifarResNet(nn.Module):
    """norm -> stem -> layer1..layerK -> pool -> fc; every child is called once, in this order."""

    def __init__(self, blocks_per_stage: list[int], widths: list[int], num_classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        in_planes = widths[0]
        self.stage_names: list[str] = []
        for i, (n, w) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, w, stride if j == 0 else 1))
                in_planes = w
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*layers))
            self.stage_names.append(name)
        _add_head_and_init(self, in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.norm(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(self.pool(x))

    def layer_names(self) -> list[str]:
        """Qualified names of the detector layers in forward order: stem, each block, fc (logits)."""
        names = ["stem"]
        for stage in self.stage_names:
            names += [f"{stage}.{j}" for j in range(len(getattr(self, stage)))]
        return names + ["fc"]


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (3x3 blocks, 16/32/64): the zoo's model, small enough to train on 2 CPU cores."""
    return CifarResNet([3, 3, 3], [16, 32, 64], num_classes)


def resnet18_cifar(num_classes: int = 10) -> CifarResNet:
    """ResNet-18 with a CIFAR stem (3x3 conv, no max-pool), 64..512: the anchor's model, used for timing."""
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes)


class CompactVGG(nn.Module):
    """norm -> block1..blockK (conv3x3-BN-ReLU, a 2x2 max-pool ends each stage) -> pool -> fc.

    ``stages`` lists the conv widths of each stage, e.g. ``[[32], [64, 64], [128, 128], [256]]``. Every
    block is one detector layer, like the ResNet blocks; no dropout, so the forward is deterministic.
    """

    def __init__(
        self,
        stages: list[list[int]],
        num_classes: int = 43,
        mean: tuple[float, ...] = GTSRB_MEAN,
        std: tuple[float, ...] = GTSRB_STD,
    ) -> None:
        super().__init__()
        self.norm = Normalize(mean, std)
        self.block_names: list[str] = []
        in_planes = 3
        for stage in stages:
            for j, w in enumerate(stage):
                conv = nn.Conv2d(in_planes, w, 3, padding=1, bias=False)
                layers: list[nn.Module] = [conv, nn.BatchNorm2d(w), nn.ReLU()]
                if j == len(stage) - 1:
                    layers.append(nn.MaxPool2d(2))
                name = f"block{len(self.block_names) + 1}"
                setattr(self, name, nn.Sequential(*layers))
                self.block_names.append(name)
                in_planes = w
        _add_head_and_init(self, in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(self.pool(x))

    def layer_names(self) -> list[str]:
        """Qualified names of the detector layers in forward order: each block, fc (logits)."""
        return [*self.block_names, "fc"]


def gtsrb_vgg(num_classes: int = 43) -> CompactVGG:
    """Compact VGG (32 | 64-64 | 128-128 | 256, BatchNorm, 0.58 M parameters): the GTSRB zoo's model."""
    return CompactVGG([[32], [64, 64], [128, 128], [256]], num_classes)


def gtsrb_vgg_small(num_classes: int = 43) -> CompactVGG:
    """Smaller candidate (32-32 | 64-64 | 128-128, 0.29 M parameters), kept for the timing comparison."""
    return CompactVGG([[32, 32], [64, 64], [128, 128]], num_classes)


class FastCifarVGG(nn.Module):
    """norm -> stem -> block1..block6 -> pool -> fc, in the layout of airbench (Keller Jordan, "94% on CIFAR-10 in
    3.29 seconds on a single GPU", 2024): a 2x2 stem convolution, then three groups of two 3x3 convolutions with
    BatchNorm and GELU whose first convolution is followed by a 2x2 max-pool (widths 64 | 256 | 256), a global
    max-pool and one linear layer; 1.97 M parameters.

    Why it is here: the well-trained CIFAR zoo should reach 88% clean accuracy on two CPU cores, and ResNet-20 reached
    86 to 88% in 45 epochs (60 epochs: +0.15 points). This net spends its arithmetic in wide convolutions, which a
    CPU runs at a higher rate than ResNet-20's 16-channel ones (almost three times the multiply-adds per image in
    less than twice the time per epoch: bench/train_speed.py). Measured on training images
    held out of training (bench/README.md, "A faster, wider network"): 88.4 to 89.3% in 12 to 20 epochs, about a
    point more; on all 50k images the clean model reached 89.6% on the test set, so it is the second well-trained
    CIFAR-10 zoo (recipe cifar_vgg, detection dataset cifar10_vgg).
    Airbench's other devices (whitened stem initialisation, lookahead, test-time flipping) are left out. Every block
    is a module, so its output is one detector layer, like the ResNet blocks.
    """

    def __init__(self, widths: tuple[int, int, int] = (64, 256, 256), num_classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 2), nn.GELU())
        self.block_names: list[str] = []
        in_planes = 24
        for width in widths:
            for first in (True, False):
                layers: list[nn.Module] = [nn.Conv2d(in_planes, width, 3, padding=1, bias=False)]
                if first:
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(width), nn.GELU()]
                name = f"block{len(self.block_names) + 1}"
                setattr(self, name, nn.Sequential(*layers))
                self.block_names.append(name)
                in_planes = width
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.norm(x))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(self.pool(x))

    def layer_names(self) -> list[str]:
        """Qualified names of the detector layers in forward order: stem, each block, fc (logits)."""
        return ["stem", *self.block_names, "fc"]


def cifar_vgg(num_classes: int = 10) -> FastCifarVGG:
    """The well-trained CIFAR zoo's model (`FastCifarVGG`, 64 | 256 | 256)."""
    return FastCifarVGG((64, 256, 256), num_classes)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": resnet20,
    "resnet18_cifar": resnet18_cifar,
    "gtsrb_vgg": gtsrb_vgg,
    "gtsrb_vgg_small": gtsrb_vgg_small,
    "cifar_vgg": cifar_vgg,
}


def build_model(name: str = "resnet20", num_classes: int = 10) -> nn.Module:
    """Factory by name, so cached weights can record which architecture they belong to."""
    try:
        return MODELS[name](num_classes)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None
