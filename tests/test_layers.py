"""Layer discovery gives the method's layers for common shapes; hooks always come off."""

import pytest
import torch
from torch import nn

from layerguard.core.capture import CaptureError, LayerCapture
from layerguard.core.layers import (
    LayerSelectionError,
    all_module_outputs,
    default_plan,
    discover_layers,
    explicit_plan,
    plan_for,
)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (same module names), small widths to keep the test fast."""

    def __init__(self, w=4, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [w, 2 * w, 4 * w, 8 * w]
        cin = w
        for i, cout in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_resnet18_has_the_methods_ten_layers():
    model = ResNet18().eval()
    layers = discover_layers(model, torch.zeros(1, 3, 64, 64))
    names = [info.name for info in layers]
    assert names == ["maxpool"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] + ["fc"]
    assert len(layers) == 10
    plan = default_plan(layers)
    # L = 10: LOI searched over 0-based 6..9 (the notebook's range); LOI-2 >= 4 must be captured
    assert plan.layers == tuple(names[4:])
    assert plan.layers[plan.loi_search_start] == names[6]


def test_exclude_logits_keeps_the_window_start_and_drops_the_output_layer():
    model = ResNet18().eval()
    sample = torch.zeros(1, 3, 64, 64)
    layers = discover_layers(model, sample)
    full, no_logits = default_plan(layers), default_plan(layers, exclude_logits=True)
    assert no_logits.layers == full.layers[:-1] and "fc" not in no_logits.layers
    assert no_logits.loi_search_start == full.loi_search_start and no_logits.total_layers == 10
    assert plan_for(model, sample, exclude_logits=True) == no_logits
    with pytest.raises(LayerSelectionError, match="--layers"):
        plan_for(model, sample, ["layer4.0", "layer4.1"], exclude_logits=True)
    with pytest.raises(LayerSelectionError, match="too few"):
        default_plan(layers[-1:], exclude_logits=True)


def test_plain_sequential_cnn_gives_stage_outputs():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 10),
    ).eval()
    names = [i.name for i in discover_layers(model, torch.zeros(1, 1, 28, 28))]
    assert names == ["3", "7", "9", "10"]


def test_explicit_layers_checked():
    model = ResNet18().eval()
    sample = torch.zeros(1, 3, 64, 64)
    available = all_module_outputs(model, sample)
    plan = explicit_plan(["layer3.1", "layer4.0", "layer4.1", "fc"], available)
    assert plan.layers == ("layer3.1", "layer4.0", "layer4.1", "fc")
    with pytest.raises(LayerSelectionError, match="--list-layers"):
        explicit_plan(["layer9.0"], available)
    with pytest.raises(LayerSelectionError, match="forward order"):
        explicit_plan(["fc", "layer4.0"], available)
    # a module called twice per pass (the block's shared ReLU) cannot be monitored
    with pytest.raises(LayerSelectionError):
        explicit_plan(["layer1.0.relu"], available)


def test_capture_returns_layer_outputs_and_removes_hooks_on_error():
    model = ResNet18().eval()
    x = torch.rand(2, 3, 64, 64)
    with LayerCapture(model, ["layer4.1", "fc"]) as cap:
        out, feats = cap.run(x)
    assert feats["fc"].shape == (2, 10) and torch.equal(feats["fc"], out)
    assert feats["layer4.1"].shape == (2, 32, 2, 2)  # as the layer returned it; rules flatten or pool
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError):
        with LayerCapture(model, ["fc"]):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_refuses_layer_modified_in_place():
    model = ResNet18().eval()
    # bn1's output is overwritten by the in-place ReLU that follows it
    with LayerCapture(model, ["bn1"]) as cap, pytest.raises(CaptureError, match="in place"):
        cap.run(torch.rand(1, 3, 32, 32))


def test_capture_unknown_layer():
    with pytest.raises(CaptureError, match="no module named"):
        LayerCapture(nn.Linear(2, 2), ["nope"])


def test_stages_list_every_module_they_compute():
    """A stage is watched at its last module, whose name alone misleads (`flatten` is the third conv block's
    output): the table shows every module of the stage."""
    from layerguard.core.layers import format_layer_table
    from layerguard.demo.mnist_model import MnistNet

    layers = discover_layers(MnistNet(), torch.zeros(1, 1, 28, 28))
    by_name = {info.name: info for info in layers}
    assert by_name["flatten"].units == ("features.8", "features.9", "features.10", "features.11", "flatten")
    assert by_name["relu"].computation == "fc1 -> relu"
    table = format_layer_table(layers, default_plan(layers))
    assert "features.8 -> features.9 -> features.10 -> features.11 -> flatten" in table
