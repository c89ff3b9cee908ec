"""Small batches keep whole outputs and reduce them after the pass, layers of equal shape together: the verdicts
must be those of the hooks' own reductions, for every rule, whatever order the shapes come in."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from layerguard.core.capture import LayerCapture, ModifiedInPlace
from layerguard.core.grouped import (
    KEEP_WHOLE_UP_TO,
    KEEP_WHOLE_UP_TO_NO_COSINE,
    GroupedReduction,
    keep_whole_limit,
)
from layerguard.core.layers import plan_for
from layerguard.core.rules import RULES
from layerguard.tooling.calibration import CalibrationConfig, calibrate

CLASSES = 5


class Branches(nn.Module):
    """Monitored shapes interleave: a [4, 6, 6], b [8, 3, 3], c [4, 6, 6], d [8, 3, 3], fc [5]. Grouped, the
    rows come out as (a, c), (b, d), (fc) and must be put back in layer order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.d = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        c = self.c(a)
        d = self.d(b)
        return self.fc(torch.cat([c.mean(dim=(2, 3)), d.mean(dim=(2, 3))], dim=1))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = Branches().eval()
    x = torch.rand(300, 3, 6, 6)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[: 3 * CLASSES] = torch.arange(3 * CLASSES) % CLASSES  # every class seen
    return model, x, y


def detector_for(model, x, y, rule):
    plan = plan_for(model, x[:1], ["a", "b", "c", "d", "fc"])
    artifact = calibrate(model, lambda: [(x[i:i + 100], y[i:i + 100]) for i in range(0, 300, 100)], plan, CLASSES,
                         CalibrationConfig(rule=rule, min_per_class=3, folds=3))
    return plan, artifact.detector()


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("similarities", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_kept_outputs_score_as_the_hooks_reductions(data, rule, similarities, layout):
    """Also for a channels_last model, whose outputs are not contiguous in NCHW order (the flattening for the
    cosine must follow the centroids' order, not the memory's)."""
    model, x, y = data
    plan, det = detector_for(model, x, y, rule)
    model = copy.deepcopy(model).to(memory_format=layout)
    batch = torch.rand(6, 3, 6, 6).contiguous(memory_format=layout)
    capture = LayerCapture(model, plan.layers, reducer=det.reducer(similarities), keep_whole_up_to=8)
    with capture:
        with torch.no_grad():
            pred = model(batch).argmax(dim=1)
        assert capture.kept_whole
        kept = det.score_capture(capture, pred, similarities)
        capture.keep_whole_up_to = 0
        capture.clear()
        with torch.no_grad():
            model(batch)
        assert not capture.kept_whole
        hooked = det.score_capture(capture, pred, similarities)
    assert (kept.similarities is None) == (hooked.similarities is None)
    if kept.similarities is not None:
        assert np.allclose(kept.similarities, hooked.similarities, atol=1e-5)
    assert np.allclose(kept.terms, hooked.terms, atol=1e-5)
    assert np.allclose(kept.scores, hooked.scores, atol=1e-5)
    assert np.array_equal(kept.poisoned, hooked.poisoned)


def test_layers_of_equal_shape_and_role_are_reduced_together(data):
    model, x, y = data
    _, det = detector_for(model, x, y, "mahalanobis-spread")
    with torch.no_grad(), LayerCapture(model, det.layer_names) as capture:
        model(x[:2])
        outputs = capture.features()
    grouped = GroupedReduction(det.profile, det.rule)
    groups, order = grouped._groups(outputs)
    assert groups == [("a", "c"), ("b", "d"), ("fc",)]
    assert order is not None and order.tolist() == [0, 2, 1, 3, 4]


def test_a_rule_that_does_not_say_which_layers_reduce_alike_is_never_grouped(data):
    model, x, y = data
    _, det = detector_for(model, x, y, "mahalanobis")
    det.rule.reduction_key = lambda name: name  # the base class's answer
    with torch.no_grad(), LayerCapture(model, det.layer_names) as capture:
        model(x[:2])
        outputs = capture.features()
    groups, _ = GroupedReduction(det.profile, det.rule)._groups(outputs)
    assert groups == [("a",), ("b",), ("c",), ("d",), ("fc",)]


def test_batches_over_the_limit_are_reduced_in_the_hooks(data):
    model, x, y = data
    plan, det = detector_for(model, x, y, "mahalanobis-spread")
    with LayerCapture(model, plan.layers, reducer=det.reducer(), keep_whole_up_to=4) as capture:
        capture.run(x[:4])
        assert capture.kept_whole
        capture.run(x[:5])
        assert not capture.kept_whole
        assert isinstance(capture.features()["a"], tuple)  # (cosine part, rule part), not the activation


def test_kept_output_changed_in_place_is_refused_not_scored():
    """Kept whole, an output that the rest of the pass changes in place would be scored wrong: refused (the
    serving handler then reduces every batch in the hooks; its load-time probe finds such a model first)."""

    class Overwrites(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            out = self.fc(h)
            h.add_(1.0)
            return out

    net = Overwrites()
    with LayerCapture(net, ("a",), reducer=lambda _n, t: t.sum(), keep_whole_up_to=8) as capture:
        with pytest.raises(ModifiedInPlace, match="in place"):
            capture.run(torch.rand(2, 4))
        capture.keep_whole_up_to = 0
        capture.run(torch.rand(2, 4))  # reduced inside the hook, before the change: fine


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_numpy_and_torch_reductions_of_kept_outputs_agree(data, rule, layout):
    """CPU float32 outputs are reduced in numpy (`ScoringRule.reduce_host`), others in torch: both must give the
    same reductions and similarities, so a verdict does not depend on where the model runs."""
    model, x, y = data
    _, det = detector_for(model, x, y, rule)
    model = copy.deepcopy(model).to(memory_format=layout)
    with torch.no_grad(), LayerCapture(model, det.layer_names) as capture:
        pred = model(torch.rand(6, 3, 6, 6).contiguous(memory_format=layout)).argmax(dim=1)
        outputs = capture.features()
    classes = pred.numpy()
    grouped = GroupedReduction(det.profile, det.rule)
    assert grouped._planned(outputs).on_host
    on_host, host_sims = grouped.reduce(outputs, classes)
    in_torch, torch_sims = grouped.reduce(outputs, classes, on_host=False)
    assert isinstance(host_sims, np.ndarray) and isinstance(torch_sims, torch.Tensor)
    assert np.allclose(host_sims, torch_sims.numpy(), atol=1e-5)
    assert on_host.keys() == in_torch.keys()
    for name, value in on_host.items():
        expected = in_torch[name]
        if isinstance(value, tuple):
            for mine, theirs in zip(value, expected, strict=True):
                assert np.allclose(mine, theirs, atol=1e-5)
        else:
            assert (value is None and expected is None) or np.allclose(value, expected, atol=1e-5)


def test_half_precision_outputs_are_reduced_in_torch(data):
    model, x, y = data
    _, det = detector_for(model, x, y, "mahalanobis-spread")
    with torch.no_grad(), LayerCapture(model, det.layer_names) as capture:
        model(x[:3])
        outputs = {n: t.to(torch.bfloat16) for n, t in capture.features().items()}
    grouped = GroupedReduction(det.profile, det.rule)
    assert not grouped._planned(outputs).on_host  # numpy has no bfloat16
    reduced, sims = grouped.reduce(outputs, np.zeros(3, dtype=np.int64))
    assert isinstance(sims, torch.Tensor) and sims.shape == (3, len(det.layer_names))


def test_keep_whole_limit_holds_kept_outputs_under_the_memory_budget():
    outputs = {"a": torch.zeros(2, 1000), "b": torch.zeros(2, 24)}  # 4096 bytes per row
    assert keep_whole_limit(outputs, up_to=32, budget=10**6) == 32
    assert keep_whole_limit(outputs, up_to=32, budget=4096 * 5 + 100) == 5
    assert keep_whole_limit(outputs, up_to=32, budget=4000) == 0
    assert keep_whole_limit(outputs) == KEEP_WHOLE_UP_TO
    assert keep_whole_limit(outputs, similarities=False) == KEEP_WHOLE_UP_TO_NO_COSINE
    maps = {"a": torch.zeros(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)}
    assert keep_whole_limit(maps) == KEEP_WHOLE_UP_TO_NO_COSINE  # copied into NCHW order after the pass
