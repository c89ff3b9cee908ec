"""model-config.yaml's `handler.layerguard` block: parsed strictly, written by wrap, read back the same."""

from __future__ import annotations

import pytest

from layerguard.core.thresholds import ThresholdPolicy
from layerguard.serving.policy import PolicyError, ServingPolicy, parse_policy
from layerguard.tooling.wrap import WrapError, guarded_model_config


def config(**block) -> dict:
    return {"handler": {"layerguard": {"inner_handler": "h.py", **block}}}


def test_defaults_and_round_trip():
    policy = parse_policy(config())
    assert policy == ServingPolicy(inner_handler="h.py")
    assert not policy.rejects and policy.threshold is None
    strict = ServingPolicy("h.py:Cls", action="reject",
                           threshold=ThresholdPolicy(tau=None, target_fpr=0.02, confidence=0.95),
                           reject_status=451, max_image_pixels=5000, response="compact")
    assert parse_policy({"handler": {"layerguard": strict.to_config()}}) == strict


@pytest.mark.parametrize("cfg, message", [
    ({}, "no `handler: layerguard:` block"),
    ({"handler": {"layerguard": {}}}, "inner_handler must name"),
    (config(tau="high"), "tau must be a number"),
    (config(tau=11), "tau must be in"),
    (config(target_fpr=0.7), "target_fpr must be in"),
    (config(fpr_confidence=0.95), "needs target_fpr beside it"),
    (config(target_fpr=0.01, fpr_confidence=1.5), "fpr_confidence must be in"),
    (config(tau=2.5, target_fpr=0.01), "not both"),
    (config(reject_status=200), "must be a 4xx code"),
    (config(artifact="../../etc/passwd"), "plain file name"),
    (config(policy="drop", extra=1), "unknown key"),
])
def test_refusals_name_the_key(cfg, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(cfg)


def test_wrap_keeps_the_originals_config_and_handler_keys():
    original = {"minWorkers": 2, "maxWorkers": 2, "handler": {"profile": True, "labels": "x.json"}}
    guarded = guarded_model_config(original, ServingPolicy("h.py", action="reject"), batch_size=4, max_batch_delay=50)
    assert guarded["handler"]["profile"] is True and guarded["handler"]["labels"] == "x.json"
    assert guarded["handler"]["layerguard"] == {"inner_handler": "h.py", "policy": "reject"}
    assert (guarded["minWorkers"], guarded["batchSize"], guarded["maxBatchDelay"]) == (2, 4, 50)
    assert "layerguard" not in original["handler"]
    with pytest.raises(WrapError, match="at least 1"):
        guarded_model_config({}, ServingPolicy("h.py"), batch_size=0, max_batch_delay=50)
