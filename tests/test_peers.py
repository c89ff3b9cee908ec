"""Fast unit tests of the peer detectors (bench/peers.py) and the benchmark helpers, on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.detection import (
    ROC_GRID,
    rates_at,
    reference_counts,
    reference_threshold,
    roc_summary,
    rule_rates,
    split_reference,
    summarise,
    tpr_at_fpr,
)
from bench.peers import Mahalanobis, ScaleUp, Strip


class CornerModel(nn.Module):
    """Class 0 with high confidence whenever the bottom-right 3x3 corner is white (a BadNets-like backdoor);
    otherwise the class follows the input's content (the top-left pixels), so predictions vary."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, :, -3:, -3:].mean(dim=(1, 2, 3))
        content = self.pool(x[:, 0, :3, :3]) * 8.0  # [B, 9]
        logits = torch.cat([1000.0 * (corner - 0.95)[:, None], content], dim=1)
        return logits


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 0.5


def _trigger(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, -3:, -3:] = 1.0
    return x


# ---- protocol helpers ---------------------------------------------------------------------------------
def test_split_reference_is_stratified_disjoint_and_deterministic() -> None:
    labels = np.repeat(np.arange(4), 30)
    ref, rest = split_reference(labels, per_class=5, seed=3)
    assert len(ref) == 20 and len(rest) == 100
    assert np.bincount(labels[ref]).tolist() == [5, 5, 5, 5]
    assert not set(ref) & set(rest) and len(set(ref) | set(rest)) == 120
    ref2, rest2 = split_reference(labels, per_class=5, seed=3)
    assert np.array_equal(ref, ref2) and np.array_equal(rest, rest2)
    with pytest.raises(ValueError):
        split_reference(labels, per_class=31, seed=0)


def test_reference_counts_take_a_share_with_a_floor_and_split_per_class() -> None:
    labels = np.repeat(np.arange(3), [60, 300, 21])
    counts = reference_counts(labels, share=0.1, minimum=20)
    assert counts.tolist() == [20, 30, 20]
    ref, rest = split_reference(labels, counts, seed=0)
    assert np.bincount(labels[ref]).tolist() == [20, 30, 20] and len(rest) == len(labels) - 70


def test_rule_rates_use_the_predicted_class_threshold_and_successful_attacks_only() -> None:
    thresholds = np.array([0.0, 10.0])
    benign, pred = np.array([-1.0, 5.0, 5.0, 20.0]), np.array([0, 0, 1, 1])
    att, att_pred = np.array([-5.0, 5.0, -5.0]), np.array([0, 0, 1])
    success = np.array([True, True, False])
    r = rule_rates(benign, pred, thresholds, success, att, att_pred)
    assert r == {"fpr": 0.5, "tpr": 0.5}
    assert np.isnan(rule_rates(benign, pred, thresholds, None, None, None)["tpr"])
    assert roc_summary(benign, None) == {} and roc_summary(benign, att)["auroc"] > 0.5


def test_reference_threshold_and_rates() -> None:
    ref = np.arange(100, dtype=float)  # 0..99
    thr = reference_threshold(ref, 0.05)
    assert 4.0 < thr < 5.0
    r = rates_at(thr, benign=np.array([0.0, 10, 20, 30]), attacks=np.array([-1.0, 1.0, 50.0]))
    assert r == {"fpr": 0.25, "tpr": pytest.approx(2 / 3)}
    assert np.isnan(rates_at(thr, np.array([1.0]), np.zeros(0))["tpr"])


def test_tpr_at_fpr_reads_the_roc_at_or_below_the_fpr() -> None:
    benign = np.arange(10, dtype=float)  # 0..9
    attacks = np.array([-5.0, 0.5, 1.5, 20.0])
    # at FPR 0 nothing benign may be flagged: threshold 0 -> only -5 flagged
    # at FPR 0.1 one benign may be flagged: threshold 1 -> -5 and 0.5 flagged
    assert tpr_at_fpr(benign, attacks, [0.0, 0.1, 0.2, 1.0]).tolist() == [0.25, 0.5, 0.75, 1.0]
    assert np.isnan(tpr_at_fpr(benign, np.zeros(0), 0.1)).all()


def test_summarise_with_and_without_attacks() -> None:
    rng = np.random.default_rng(0)
    ref, ben, att = rng.normal(size=200), rng.normal(size=300), rng.normal(-3, 1, size=100)
    s = summarise(ref, ben, att, passes=1, seconds=0.5)
    assert s["auroc"] > 0.95 and s["n_attacks"] == 100
    assert 0 <= s["ref_fpr_0.01"]["fpr"] <= 0.05 and s["ref_fpr_0.05"]["tpr"] > 0.8
    assert len(s["roc"]["fpr"]) == len(ROC_GRID) == len(s["roc"]["tpr"])
    json.dumps(s)  # results must be JSON-ready
    clean = summarise(ref, ben, None, passes=1, seconds=0.1)
    assert "auroc" not in clean and np.isnan(clean["ref_fpr_0.01"]["tpr"])


# ---- peers --------------------------------------------------------------------------------------------
def test_strip_gives_triggered_inputs_lower_entropy() -> None:
    model = CornerModel().eval()
    pool = _images(64, seed=1)
    strip = Strip(model, pool, n=8, seed=0, batch=64)
    assert strip.forward_passes == 9
    benign, triggered = strip.score(_images(20, seed=2)), strip.score(_trigger(_images(20, seed=3)))
    assert benign.shape == (20,) and triggered.shape == (20,)
    assert triggered.max() < benign.min()
    with pytest.raises(ValueError):
        Strip(model, pool[:0])


def test_scaleup_flags_consistent_predictions() -> None:
    model = CornerModel().eval()
    su = ScaleUp(model, batch=60)
    assert su.forward_passes == 6
    spc, pred = su.spc(_trigger(_images(10, seed=4)))
    assert np.all(spc == 1.0) and np.all(pred == 0)  # the trigger survives amplification
    ref_scores = su.fit(_images(50, seed=5), num_classes=10)
    assert ref_scores.shape == (50,) and su.mean is not None and su.mean.shape == (10,)
    benign, triggered = su.score(_images(30, seed=6)), su.score(_trigger(_images(30, seed=7)))
    assert np.median(triggered) <= np.median(benign)


def test_mahalanobis_scores_outliers_lower_and_runs_on_a_model() -> None:
    rng = np.random.default_rng(0)
    means = rng.normal(0, 5, size=(3, 4))
    labels = np.repeat(np.arange(3), 40)
    feats = torch.from_numpy(means[labels] + rng.normal(size=(120, 4)))
    maha = Mahalanobis("pool").fit(feats, labels, 3)
    inliers = maha.score_features(torch.from_numpy(means + 0.1), np.arange(3))
    outliers = maha.score_features(torch.from_numpy(means + 6.0), np.arange(3))
    assert np.all(outliers < inliers)
    model = CornerModel().eval()
    x = _images(12, seed=8)
    with torch.no_grad():
        f = model.pool(x[:, 0, :3, :3])
    maha = Mahalanobis("pool").fit(f, np.arange(12) % 10, 10)
    s = Mahalanobis.score(maha, model, x, batch=5)
    assert s.shape == (12,) and np.all(np.isfinite(s))
    with pytest.raises(RuntimeError):
        Mahalanobis().score_features(feats, labels)


# ---- the report ---------------------------------------------------------------------------------------
def _rule(rng: np.random.Generator, tpr: float, fpr: float, auroc: float, attacked: bool) -> dict:
    cell = {"tpr": tpr if attacked else float("nan"), "fpr": fpr, "reference_fpr": 0.01}
    r = {"layers": ["b1", "fc"], "term_layers": ["b1", "fc"], "tau": {"2.5": cell},
         "target_fpr": {"0.01": cell, "0.05": {**cell, "fpr": 0.05}},
         "target_fpr_by_predicted": {"0.01": {**cell, "fpr": 0.009}}}
    if attacked:
        r.update(roc_summary(rng.normal(size=80), rng.normal(-3 * auroc, 1, size=40)))
        r["auroc"] = auroc
    return r


def _fake_results(root: Path) -> None:
    rng = np.random.default_rng(1)
    configs = [{"key": k, "label": label, "rule": k.split("/")[0], "options": {}, "folds": 5, "exclude_logits": False,
                "tau": None, "policy": {"target_fpr": 0.01}}
               for k, label in (("cosine-loi", "cosine-loi"), ("mahalanobis", "mahalanobis (all)"))]
    models = {}
    for name, attacked in (("clean", False), ("badnets", True), ("wanet", True)):
        peers = {n: summarise(rng.normal(size=50), rng.normal(size=80),
                              rng.normal(-2, 1, size=40) if attacked else None, passes, 0.1)
                 for n, passes in (("Mahalanobis (peer)", 1), ("SCALE-UP", 6), ("STRIP", 21))}
        peers["STRIP"]["n"] = 20
        models[name] = {
            "target": 0, "zoo": {"clean_acc": 0.9, "asr": 0.99 if attacked else None}, "clean_acc_scored": 0.9,
            "reference_acc": 0.7, "asr_scored": 0.98 if attacked else None, "n_successful": 40 if attacked else 0,
            "n_benign": 80, "seconds": 3.0, "peers": peers,
            "rules": {"cosine-loi": _rule(rng, 0.5, 0.02, 0.9, attacked),
                      "mahalanobis": _rule(rng, 0.995 if name == "badnets" else 0.6, 0.012, 0.97, attacked)},
        }
    models["badnets"]["layer_diagnostic"] = {"layers": ["b1", "fc"], "cosine": [0.99, 0.6], "cosine_benign_n": 9,
                                             "mahalanobis": [0.9, 0.8], "mahalanobis_layers": ["b1", "fc"],
                                             "window_target": ["b1", "fc"], "spread": [0.95],
                                             "spread_layers": ["b1"]}
    machine = {"cpu": "test cpu", "cores": 2, "os": "Linux", "python": "3", "torch": "2", "torch_threads": 1}
    detection = {
        "command": "x", "date": "today", "machine": machine, "seconds": 1.0, "dataset": "cifar10",
        "dataset_label": "CIFAR-10", "data": "d.npz", "missing": ["sig"], "configs": configs,
        "protocol": {"reference": "10% of each class", "n_benign": 80, "n_poison": 40, "n_scaleup": 80,
                     "n_strip": 80, "strip_n": 20, "seed": 0},
        "models": models,
    }
    cal = {"command": "c", "date": "today", "machine": machine, "seconds": 2.0, "model": "resnet20", "batch": 100,
           "threads": 1, "runs": [{"images": n, "seconds": 1.0, "images_per_s": 100.0, "peak_extra_mb": 50.0,
                                   "peak_rss_mb": 300.0} for n in (500, 1000)]}
    archive = {"ok": 10, "requests": 10, "rps": 100.0, "rps_per_phase": [100.0], "p50_ms": 10.0, "p99_ms": 20.0,
               "cpu_ms_per_request": {"worker": 4.0, "frontend": 2.0, "client": 1.0}}
    setup = {"weights": "w.pt", "worker_threads": 1, "batch_size": 8, "max_batch_delay_ms": 5, "concurrency": 8,
             "requests_per_phase": 10, "rounds": 1, "order": "ABBA", "warmup_per_archive": 1, "calibration_images": 9}

    def formed(sizes: dict[str, int], ms: float) -> dict:  # what serving_load.torchserve_batches returns
        requests = sum(int(n) * k for n, k in sizes.items())
        return {"batches": sum(sizes.values()), "requests": requests, "mean_batch": requests / sum(sizes.values()),
                "batch_sizes": sizes, "handler_ms_per_request": ms}

    serving = {"command": "s", "date": "today", "machine": machine, "seconds": 3.0, "archs": {
        arch: {"setup": {**setup, "model": arch}, "handler_in_process": {},
               "results": {"plain": {**archive, "torchserve_batches": formed({"2": 1, "6": 1}, 10.0)},
                           "guarded": {**archive, "rps": 100.0 * ratio,
                                       "torchserve_batches": formed({"2": 1, "8": 1}, 11.0)},
                           "guarded_rps_ratio": ratio, "guarded_p50_ratio": 1.0, "guarded_p99_ratio": 1.0}}
        for arch, ratio in (("small net", 0.9), ("big net", 0.99))}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "serving_load.json").write_text(json.dumps(serving))
    (root / "detection_cifar10.json").write_text(json.dumps(detection))
    (root / "calibration_cost.json").write_text(json.dumps(cal))


def test_render_builds_the_page_from_json_only(tmp_path: Path) -> None:
    from bench.run_all import render

    _fake_results(tmp_path / "results")
    text = render(tmp_path / "results", tmp_path / "docs")
    assert (tmp_path / "docs" / "benchmarks.md").read_text() == text
    assert "**By measurement the best rule is `mahalanobis (all)`**" in text  # chosen from the JSON
    assert "it detects on average 79.8% of successful attacks at a delivered 1% FPR" in text  # (99.5 + 60) / 2
    assert "BadNets 99.5% at 1.20% (not met)" in text  # delivered FPR above 1%: the target is not met
    assert "WaNet 0.970 (met)" in text  # the stretch AUROC
    assert "ties within 1 point) on every backdoored model: met, 2 of 2" in text  # target (4): the single-pass peer
    assert "| **mahalanobis (all)** | 79.8 | 79.8 | 60.0 |" in text  # the decision table (all, CIFAR-10, lowest)
    assert "| BadNets | **mahalanobis (all)** | 0.970 | 99.5 | 1.20 |" in text  # model x rule
    assert "| BadNets | STRIP (N=20) | 21 |" in text  # peers at equal FPR
    assert "| BadNets | cosine (n benign 9) | **0.990** | **0.600** |" in text  # layer diagnostic
    assert "| BadNets | spread | 0.950 | - |" in text  # the spread term exists for spatial layers only
    assert "| BadNets | 70.0 | 2.00 / 0.90 | 50.0 / 50.0 |" in text  # the threshold-source diagnostic (cosine)
    assert "CIFAR-10 (reference accuracy 70.0%): 2.00% FPR and 50.0% TPR shipped" in text  # ... in the conclusion
    assert "Not evaluated (no trained weights when this ran): SIG." in text
    assert "- TorchServe, small net, guarded vs plain .mar: throughput x0.900" in text  # one line per architecture
    assert "#### big net" in text and "throughput x0.990" in text
    # the batches TorchServe formed: sizes from both archives as columns, and the handler's ratio per request
    assert "| plain | 2 | 4.00 | 1 | 1 | 0 | 10.00 |" in text and "| guarded | 2 | 5.00 | 1 | 0 | 1 | 11.00 |" in text
    assert "Handler time per request, guarded / plain: x1.100, at a mean batch of 4.0 and 5.0 requests" in text
    for img in ("detection_roc_cifar10.png", "detection_fpr_cifar10.png", "calibration_cost.png"):
        assert (tmp_path / "docs" / "img" / img).stat().st_size > 0
    assert "## Cost" not in text  # no overhead.json: its section is left out rather than invented
    assert "Where the threshold's error comes from" not in text
    rows = [{"model": "clean", "share": share, "folds": folds, "seed": seed, "confidence": confidence,
             "n_reference": 100, "n_benign": 900, "floor_classes": 0, "delivered_fpr": fpr, "expected_sd": 0.01}
            for share, folds, seed, fpr, confidence in ((0.2, 5, 0, 0.008, None), (0.2, 5, 1, 0.006, None),
                                                        (0.2, 10, 0, 0.011, None), (0.2, 5, 0, 0.004, 0.95),
                                                        (0.2, 5, 1, 0.012, 0.95))]
    (tmp_path / "results" / "reference_share_gtsrb.json").write_text(json.dumps(
        {"command": "x", "date": "d", "seconds": 1.0, "dataset": "gtsrb", "target_fpr": 0.01, "floor": 10,
         "rule": "mahalanobis", "rows": rows}))
    text = render(tmp_path / "results", tmp_path / "docs")
    # means of the expected-rate rows only, by folds; the bounded rows are their own table rows
    assert "gtsrb: 5 folds 0.70% (2 calibrations), 10 folds 1.10% (1 calibration)." in text
    assert ("| GTSRB | clean | 20% (100; 0 at the floor) | 5 | expected rate | 2 | 0.70 | 0.60-0.80 | 0 / 2 "
            "| 1.00 |") in text
    assert ("| GTSRB | clean | 20% (100; 0 at the floor) | 5 | at most, 95% confidence | 2 | 0.80 | 0.40-1.20 | 1 / 2 "
            "| 1.00 |") in text


# ---- helpers of the cost benchmarks -------------------------------------------------------------------
def test_time_interleaved_and_ratios() -> None:
    from bench.overhead import ratios, summary, time_interleaved

    calls: list[str] = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert calls.count("a") == calls.count("b") == 5 and calls[:2] == ["a", "b"] and calls[2:4] == ["b", "a"]
    assert len(times["a"]["wall"]) == len(times["a"]["cpu"]) == 4
    s = summary({"wall": [0.001, 0.002, 0.003], "cpu": [0.001, 0.001, 0.001]})
    assert s["median_ms"] == pytest.approx(2.0) and s["cpu_median_ms"] == pytest.approx(1.0)
    r = ratios({"wall": [2.0, 4.0], "cpu": [1.1, 1.1]}, {"wall": [1.0, 2.0], "cpu": [1.0, 1.0]})
    assert r["wall_median_paired_ratio"] == pytest.approx(2.0) and r["cpu_ratio_of_medians"] == pytest.approx(1.1)


def test_calibration_stream_reads_one_batch_at_a_time(tmp_path: Path) -> None:
    from bench.calibration_cost import interleaved_by_class, stream

    labels = np.repeat(np.arange(3), 4)
    idx = interleaved_by_class(labels, 6)
    assert labels[idx].tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError):
        interleaved_by_class(labels, 15)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    images.tofile(tmp_path / "x.u8")
    batches = stream(tmp_path / "x.u8", np.arange(5), batch=2)
    got = list(batches())
    assert [len(y) for _, y in got] == [2, 2, 1]
    assert torch.allclose(got[2][0][0], torch.from_numpy(images[4]).permute(2, 0, 1).float() / 255)
    assert len(list(batches())) == 3  # calibrate() iterates twice


def test_serving_load_combine_and_cpu_reading() -> None:
    import os

    from bench.serving_load import combine, cpu_seconds

    phase = {"seconds": 2.0, "ok": 4, "errors": 0, "error_kinds": [], "flagged": 1,
             "latencies": [0.01, 0.02, 0.03, 0.04], "cpu_seconds": {"worker": 0.008, "frontend": 0.004, "client": 0.0}}
    c = combine([phase, {**phase, "seconds": 1.0}])
    assert c["rps"] == pytest.approx(8 / 3) and c["requests"] == 8 and c["flagged"] == 2
    assert c["p50_ms"] == pytest.approx(25.0) and c["cpu_ms_per_request"]["worker"] == pytest.approx(2.0)
    assert cpu_seconds(os.getpid()) > 0 and np.isnan(cpu_seconds(None))


def test_batches_torchserve_formed_are_read_from_its_handler_time_lines() -> None:
    """Batch sizes come from the request ids on each HandlerTime line (TorchServe's own log format, copied from a
    real ts_log.log); a line logged twice counts once; other metrics and models are kept apart."""
    from bench.serving_load import torchserve_batches

    def line(model: str, ms: float, ids: list[str], metric: str = "HandlerTime") -> str:
        return (f"2026-12-02T19:08:18,242 [INFO ] W-9000-{model}_1.0-stdout org.pytorch.serve.wlm.WorkerLifeCycle - "
                f"result=[METRICS]{metric}.Milliseconds:{ms}|#ModelName:{model},Level:Model|#type:GAUGE|"
                f"#hostname:vm,1796238498,{','.join(ids)}, pattern=[METRICS]\n")

    text = (line("cifar_plain", 84.5, ["a1", "a2", "a3"]) + line("cifar_plain", 84.5, ["a1", "a2", "a3"])
            + line("cifar_plain", 30.0, ["b1"]) + line("cifar_plain", 99.0, ["c1"], metric="PredictionTime")
            + line("cifar_guarded", 120.0, [f"g{i}" for i in range(8)]))
    formed = torchserve_batches(text)
    plain, guarded = formed["cifar_plain"], formed["cifar_guarded"]
    assert plain["batches"] == 2 and plain["requests"] == 4 and plain["batch_sizes"] == {"1": 1, "3": 1}
    assert plain["mean_batch"] == pytest.approx(2.0) and plain["handler_ms_per_request"] == pytest.approx(114.5 / 4)
    assert guarded["batch_sizes"] == {"8": 1} and guarded["handler_ms_per_request"] == pytest.approx(15.0)
    assert torchserve_batches("no metrics here") == {}


def test_round_ratios_pair_each_abba_round_and_render_their_spread() -> None:
    """A round's throughput is the harmonic mean of its phases (equal requests per phase); the page shows every
    round's paired ratio and their range next to the overall one, and nothing when there are no whole rounds."""
    from bench.benchutil import round_ratios
    from bench.run_all import round_range, round_spread

    plain, guarded = [100.0, 300.0, 200.0, 200.0], [100.0, 100.0, 190.0, 210.0]
    ratios = round_ratios(plain, guarded)
    assert ratios == pytest.approx([100.0 / 150.0, (2 / (1 / 190 + 1 / 210)) / 200.0])
    with pytest.raises(ValueError, match="whole rounds"):
        round_ratios(plain[:3], guarded[:3])
    r = {"plain": {"rps_per_phase": plain}, "guarded": {"rps_per_phase": guarded}}
    text = round_spread(r, {"order": "plain, guarded, guarded, plain (ABBA)"})
    assert "x0.667, x0.998" in text and "median x0.832, range x0.667-x0.998" in text
    assert round_range(r) == "; per round x0.67-x1.00 over 2 rounds"
    one = {"plain": {"rps_per_phase": [100.0]}, "guarded": {"rps_per_phase": [90.0]}}
    assert round_spread(one, {"order": "ABBA"}) == "" and round_range(one) == ""


def test_compact_serving_run_gets_its_own_rows_on_the_page_and_headline() -> None:
    """`bench/serving_load.py --response compact` writes its own result file; the page shows it after the default
    run, labelled as compact in the heading and the headline, so the two ratios are never read as one."""
    from bench.run_all import headline_section, serving_section
    from bench.serving_load import result_name

    assert result_name("full") == "serving_load" and result_name("compact") == "serving_load_compact"

    def run(response: str, rps: float) -> dict:
        setup = {"model": "CIFAR ResNet-20 (0.27 M params)", "weights": "w", "worker_threads": 1, "batch_size": 8,
                 "max_batch_delay_ms": 5, "concurrency": 8, "requests_per_phase": 400, "rounds": 1,
                 "order": "plain, guarded, guarded, plain (ABBA)", "warmup_per_archive": 50,
                 "calibration_images": 1000, "rule": "mahalanobis-spread", "response": response}
        phase = {"ok": 800, "requests": 800, "rps": 100.0, "rps_per_phase": [100.0, 100.0], "p50_ms": 10.0,
                 "p99_ms": 20.0, "cpu_ms_per_request": {"worker": 4.0, "frontend": 1.0, "client": 1.0}}
        guarded = {**phase, "rps": rps, "rps_per_phase": [rps, rps], "cpu_ms_per_request": {"worker": 4.4}}
        results = {"plain": phase, "guarded": guarded, "guarded_rps_ratio": rps / 100.0, "guarded_p50_ratio": 1.0,
                   "guarded_p99_ratio": 1.0}
        return {"command": "c", "date": "d", "seconds": 1.0, "archs": {"resnet20": {"setup": setup, "results": results,
                                                                                    "handler_in_process": None}}}

    full, compact = run("full", 92.0), run("compact", 97.5)
    page = "\n".join(serving_section(full, compact))
    assert "#### CIFAR ResNet-20 (0.27 M params)\n" in page
    assert "#### CIFAR ResNet-20 (0.27 M params) with `response: compact`" in page
    assert "throughput x0.920" in page and "throughput x0.975" in page
    head = "\n".join(headline_section({}, None, full, compact))
    assert "guarded vs plain .mar: throughput x0.920" in head
    assert "guarded (`response: compact`) vs plain .mar: throughput x0.975" in head
    assert "compact" not in "\n".join(serving_section(full))


def test_figures_give_every_series_its_own_colour() -> None:
    """The detection figures carry a dozen rule configurations plus three peers; a colour used twice would make two
    legend entries read as one, so the palette has 20 distinct colours and refuses to wrap."""
    from bench.run_all import distinct_colours

    colours = distinct_colours(15)
    assert len(set(colours)) == 15
    assert len(set(distinct_colours(20))) == 20
    with pytest.raises(ValueError, match="distinct colours"):
        distinct_colours(21)


def test_zoo_tables_keep_each_recipe_to_its_own_table(tmp_path: Path) -> None:
    """bench/README.md's weakly trained CIFAR-10 table lists only that recipe's models: the well-trained CIFAR-10
    models share the dataset but have their own status table, and GTSRB models go to the GTSRB table."""
    from bench.zoo_table import gtsrb_table, zoo_table

    base = {"model": "m", "clean_acc": 0.9, "epochs": 1, "seconds_train": 1.0, "attack": {"name": "badnets"},
            "asr": 0.9, "target": 0, "clean_acc_per_class": [0.9] * 43}
    files = {"badnets": {}, "cifar_full_badnets": {"dataset": "cifar", "recipe": "cifar_full"},
             "cifar_ft_badnets": {"dataset": "cifar", "recipe": "cifar_ft"},
             "gtsrb_badnets": {"dataset": "gtsrb", "recipe": "gtsrb", "history": [{"val_clean_acc": 0.9}],
                               "seconds_per_epoch": 1.0}}
    for name, extra in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**base, **extra}))
    weak = zoo_table(tmp_path)
    assert "| badnets (m)" in weak and "cifar_full_" not in weak and "cifar_ft_" not in weak and "gtsrb" not in weak
    assert "| gtsrb_badnets (m)" in gtsrb_table(tmp_path) and "cifar" not in gtsrb_table(tmp_path)


def test_compile_probe_section_reads_its_verdicts_from_the_rows() -> None:
    """The torch.compile probe's section judges each row against issue 14's targets from the recorded numbers
    (batch 1: 10%, batch 32: 3%), in both modes, and says nothing when the probe has not been run."""
    from bench.run_all import compile_section

    def row(batch: int, eager: float, compiled: float) -> dict:
        return {"arch": "resnet20", "batch": batch, "eager plain ms": 3.0, "eager added %": eager,
                "compiled plain ms": 2.5, "compiled added %": compiled, "compiled guarded vs eager plain %": 1.0,
                "compile seconds": {"guarded": 9.0}, "same verdicts": True}

    cp = {"command": "c", "date": "d", "torch": "t", "rule": "r", "repeats": 3,
          "rows": [row(1, 30.0, 8.0), row(32, 2.0, 9.5)]}
    text = "\n".join(compile_section(cp))
    assert "resnet20 batch 1 met compiled (not met eager)" in text
    assert "resnet20 batch 32 not met compiled (met eager)" in text
    assert "moves by 22.0 points at most" in text
    assert compile_section(None) == [] and compile_section({"rows": []}) == []


def test_attack_is_rebuilt_with_the_training_settings() -> None:
    from bench.detection import attack_from_meta

    meta = {"attack": {"name": "wanet", "target": 0, "rate": 0.1, "k": 4, "s": 2.0, "seed": 4321,
                       "unknown_note": "ignored"}}
    assert attack_from_meta("wanet", meta).s == 2.0
    assert attack_from_meta("wanet", None).s == 0.5  # no record: the attack's defaults


# ---- the well-trained CIFAR-10 zoo: rows, routes, the decision on well-trained zoos ------------------------
def test_well_trained_cifar_rows_map_to_weights_and_attacks() -> None:
    from bench.detection import ATTACKS, DATASETS, FINE_TUNED, attack_from_meta, main

    ds = DATASETS["cifar10_full"]
    rows = ds.model_rows()
    assert rows["clean"].stem == "cifar_full_clean" and rows["badnets_scratch"].stem == "cifar_full_badnets"
    assert rows["badnets_ft"].stem == "cifar_ft_badnets" and rows["badnets_ft"].attack == "badnets"
    assert {r.attack for r in rows.values()} == {"clean", *ATTACKS}  # every attack has a row
    assert list(ds.select(["badnets"])) == ["badnets_scratch", "badnets_ft"]  # an attack selects every route
    assert list(ds.select(["badnets_scratch"])) == ["badnets_scratch"]  # a row name only that row
    assert not set(rows) & set(ATTACKS)  # so no row name is also an attack
    assert list(ds.select(["sig_ft", "clean"])) == ["clean", "sig_ft"]  # table order
    assert ds.stem("wanet_ft") == "cifar_ft_wanet"
    assert DATASETS["gtsrb"].stem("sig") == "gtsrb_sig" and DATASETS["cifar10"].stem("badnets") == "badnets"
    assert list(DATASETS["cifar10"].model_rows()) == ["clean", *ATTACKS]
    vgg = DATASETS["cifar10_vgg"].model_rows()  # the fast-VGG zoo: every attack from scratch, one row each
    assert list(vgg) == ["clean", *ATTACKS] and vgg["wanet"].stem == "cifar_vgg_wanet"
    # the records on disk agree with the rows (attack and route), for the models trained so far
    weights = Path(__file__).resolve().parents[1] / "bench" / "weights"
    for spec in rows.values():
        path = weights / f"{spec.stem}.json"
        if not path.is_file():
            continue
        meta = json.loads(path.read_text())
        assert (meta.get("attack") or {}).get("name", "clean") == spec.attack, spec.stem
        assert meta["route"].startswith("poisoned fine-tuning") == (spec.route == FINE_TUNED), spec.stem
    for spec in vgg.values():  # the fast-VGG zoo's records: its model, the row's attack, trained from scratch
        path = weights / f"{spec.stem}.json"
        if path.is_file():
            meta = json.loads(path.read_text())
            assert (meta["model"], meta["route"]) == ("cifar_vgg", "from scratch"), spec.stem
            assert (meta.get("attack") or {}).get("name", "clean") == spec.attack, spec.stem
    with pytest.raises(ValueError, match="blended"):
        attack_from_meta("badnets", {"attack": {"name": "blended", "alpha": 0.2}})
    with pytest.raises(SystemExit):
        main(["--datasets", "cifar10_full", "--models", "nope"])


def test_render_decides_on_the_well_trained_zoos(tmp_path: Path) -> None:
    """A well-trained CIFAR-10 section with two routes per attack, and the weakly trained zoo shown but not
    counted in the decision."""
    import copy

    from bench.run_all import render

    results = tmp_path / "results"
    _fake_results(results)
    weak = json.loads((results / "detection_cifar10.json").read_text())
    full = copy.deepcopy(weak)
    for m in weak["models"].values():
        m["clean_acc_scored"] = 0.7  # weakly trained
    (results / "detection_cifar10.json").write_text(json.dumps(weak))
    scratch, ft = "from scratch", "poisoned fine-tuning of cifar_full_clean"
    src = full["models"]
    models = {"clean": {**src["clean"], "attack": "clean", "route": scratch, "zoo": {"epochs": 45}},
              "badnets_scratch": {**src["badnets"], "attack": "badnets", "route": scratch, "zoo": {"epochs": 45}},
              "badnets_ft": copy.deepcopy({**src["badnets"], "attack": "badnets", "route": ft, "zoo": {"epochs": 6}}),
              "wanet_ft": {**src["wanet"], "attack": "wanet", "route": ft, "zoo": {"epochs": 12}}}
    models["badnets_ft"]["rules"]["mahalanobis"]["target_fpr"]["0.01"]["tpr"] = 0.9
    rows = {"clean": {"stem": "cifar_full_clean", "attack": "clean", "route": ""},
            **{r: {"stem": f"cifar_{'ft' if r.endswith('_ft') else 'full'}_{a}", "attack": a,
                   "route": "fine-tuned" if r.endswith("_ft") else "from scratch"}
               for r, a in (("badnets_scratch", "badnets"), ("badnets_ft", "badnets"), ("blended_scratch", "blended"),
                            ("wanet_ft", "wanet"))}}
    full.update(dataset="cifar10_full", dataset_label="CIFAR-10, well-trained ResNet-20", models=models, rows=rows,
                missing=["blended_scratch"])
    (results / "detection_cifar10_full.json").write_text(json.dumps(full))

    text = render(results, tmp_path / "docs")
    assert text.index("### CIFAR-10, well-trained ResNet-20") < text.index("### CIFAR-10, weakly trained")
    assert "The decision is made on the well-trained zoos (CIFAR-10, well-trained ResNet-20)" in text
    # counted: the three backdoored well-trained models only, (99.5 + 90 + 60) / 3; the weak zoo's 79.8 shown apart
    assert "| **mahalanobis (all)** | 83.2 | 83.2 | 79.8 | 60.0 |" in text
    assert "mean TPR @1%, CIFAR-10, weakly trained (not counted) |" in text
    assert "BadNets (from scratch) 99.5% at 1.20% (not met), BadNets (fine-tuned) 90.0% at 1.20% (not met)" in text
    assert "| BadNets (fine-tuned) | poisoned fine-tuning of cifar_full_clean | 6 | 0 |" in text  # route per row
    assert "| WaNet (fine-tuned) | **mahalanobis (all)** |" in text
    assert "Not evaluated (no trained weights when this ran): Blended (from scratch): `cifar_full_blended`." in text
    assert "the well-trained CIFAR-10 zoo has its own section above" in text
    headline = text.split("## Headline")[1].split("\n## ")[0]
    assert headline.index("CIFAR-10, well-trained ResNet-20, BadNets (fine-tuned): TPR 90.0%") < \
        headline.index("- CIFAR-10, weakly trained (70.0 to 70.0% clean accuracy; not counted in the decision)")
    assert "weakly trained, BadNets" not in headline  # the weak zoo is one summary line
    for img in ("detection_roc_cifar10_full.png", "detection_fpr_cifar10_full.png"):
        assert (tmp_path / "docs" / "img" / img).stat().st_size > 0


def test_decision_never_rewards_flagging_more_than_asked():
    """When no rule keeps the delivered FPR within 0.5 points everywhere, the one that breaks it least wins,
    not the one whose looser threshold buys the most TPR."""
    from bench.run_all import best_config

    def row(over: float, tpr: float) -> dict:
        return {"mean_tpr_1": tpr, "max_over_1": over, "mean_auroc": 0.9}

    assert best_config({"loose": row(0.03, 0.95), "tight": row(0.007, 0.60)}) == "tight"
    assert best_config({"loose": row(0.03, 0.95), "ok": row(0.004, 0.50)}) == "ok"
    assert best_config({}) is None


def test_worker_breakdown_times_each_stage_and_leaves_the_handler_as_it_was(monkeypatch) -> None:
    import time

    from bench import serving_load
    from bench.run_all import worker_breakdown_lines

    def busy(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    class Handler:  # a BaseHandler-shaped plain handler: handle = postprocess(inference(preprocess(data)))
        def preprocess(self, data):
            busy(0.002)
            return data

        def inference(self, x):
            busy(0.004)
            return x

        def postprocess(self, y):
            return [{"class": 1} for _ in y]

        def handle(self, data, context):
            busy(0.001)  # bookkeeping outside every stage
            return self.postprocess(self.inference(self.preprocess(data)))

    monkeypatch.setattr("layerguard.tooling.worker.set_requests", lambda context, n: None)
    handler = Handler()
    result = serving_load.worker_breakdown({"plain": (handler.handle, None)}, [b"x"], batch=4, repeats=3)
    stages = {st["stage"]: st["ms_per_batch"] for st in result["archives"]["plain"]["stages"]}
    assert stages["preprocess (PNG decode, stack)"] == pytest.approx(2.0, abs=0.5)
    assert stages[serving_load.FORWARD] == pytest.approx(4.0, abs=0.5)
    assert stages["other (handler bookkeeping, per-item Python)"] == pytest.approx(1.0, abs=0.5)
    assert result["archives"]["plain"]["handle_ms_per_batch"] == pytest.approx(7.0, abs=1.0)
    assert not vars(handler)  # every wrapper removed: the instance serves as before
    text = "\n".join(worker_breakdown_lines(result))
    assert "| preprocess (PNG decode, stack) | 2." in text and "| response body per item (bytes) | 12 |" in text
