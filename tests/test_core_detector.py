"""The detector on hand-made numbers: layer of interest, thresholds, both rules, cross-fitting, bad input."""

import numpy as np
import pytest
import torch

from layerguard.core.detector import Detector, DetectorFitter, DetectorSpec
from layerguard.core.host import host
from layerguard.core.rules import RULES, FitError, create_rule, parse_rule_options
from layerguard.core.rules.cosine_loi import window_matrix
from layerguard.core.rules.mahalanobis import oas_shrinkage
from layerguard.core.similarity import MATMUL_MAX_CLASSES, CosineProfile, layer_of_interest, pool
from layerguard.core.thresholds import BenignScores, ThresholdPolicy


def test_loi_is_largest_jump_in_window():
    curve = [0.1, 0.2, 0.9, 0.95, 0.96, 0.97]
    assert layer_of_interest(curve, search_start=3) == 3  # the largest jump lies before the window
    assert layer_of_interest(curve, search_start=1) == 2


def test_loi_edges():
    assert layer_of_interest([0.5, 0.55, 0.6, 0.99], search_start=2) == 3
    assert layer_of_interest([0.7], search_start=0) == 0
    assert layer_of_interest([0.2, 0.8], search_start=0) == 1  # start raised to 1
    assert layer_of_interest([0.2, 0.8, 0.3], search_start=5) == 2  # empty window -> last layer
    assert layer_of_interest([0.0, 0.1, 0.2, 0.3], search_start=1) == 1  # ties go to the earliest


def test_window_matrix_clips_at_first_layer():
    w = window_matrix(4)
    assert w[0].tolist() == [1, 0, 0, 0] and w[1].tolist() == [1, 1, 0, 0] and w[3].tolist() == [0, 1, 1, 1]


def test_policy_validation_and_default():
    assert ThresholdPolicy() == ThresholdPolicy(tau=None, target_fpr=0.01)
    assert ThresholdPolicy.from_options(tau=2.5).tau == 2.5
    for bad in (dict(tau=None, target_fpr=None), dict(tau=2.0, target_fpr=0.1), dict(tau=-1, target_fpr=None),
                dict(tau=None, target_fpr=0.9)):
        with pytest.raises(ValueError):
            ThresholdPolicy(**bad)
    with pytest.raises(ValueError, match="not both"):
        ThresholdPolicy.from_options(tau=1.0, target_fpr=0.1)


def test_tau_thresholds_are_the_papers_per_class_rule():
    scores = np.array([1.0, 3.0, 10.0, 12.0])
    labels = np.array([0, 0, 1, 1])
    benign = BenignScores(scores, labels, 2)
    assert np.allclose(benign.thresholds(ThresholdPolicy(tau=2.0, target_fpr=None)), [2.0 - 2.0, 11.0 - 2.0])


def test_target_fpr_threshold_keeps_reference_fpr_at_or_below_target():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=4000)
    scores = rng.normal(labels * 3.0, 1.0 + labels)  # classes differ in scale: standardisation matters
    benign = BenignScores(scores, labels, 5)
    for target in (0.01, 0.05):
        share = benign.flagged_share(ThresholdPolicy(target_fpr=target))
        assert target - 0.003 <= share <= target


def test_profile_similarities_and_many_class_path():
    centroids = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    prof = CosineProfile(("a",), centroids)
    sims = prof.similarities({"a": torch.tensor([[2.0, 0.0], [1.0, 1.0]])}, torch.tensor([0, 1]))
    assert torch.allclose(sims[:, 0], torch.tensor([1.0, 2 ** -0.5]), atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    c = MATMUL_MAX_CLASSES + 6
    many = CosineProfile(("a",), {"a": torch.randn(c, 9, generator=gen)})
    feats = torch.randn(5, 9, generator=gen)
    classes = torch.tensor([0, 3, c - 1, 7, 3])
    expected = torch.nn.functional.cosine_similarity(feats, many.centroids["a"][classes], dim=1)
    assert torch.allclose(many.similarities({"a": feats}, classes)[:, 0], expected, atol=1e-6)


def test_pool_averages_spatial_dims():
    t = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.allclose(pool(t), t.mean(dim=(2, 3)))
    assert pool(torch.ones(2, 5)).shape == (2, 5)


def test_mahalanobis_terms_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 4)) + np.repeat(np.eye(4)[:2] * 3, 100, axis=0)
    y = np.repeat([0, 1], 100)
    rule = create_rule("mahalanobis", ("a",), 2)
    stats = rule.new_statistics({"a": torch.from_numpy(x)})
    rule.update(stats, {"a": torch.from_numpy(x)}, torch.from_numpy(y))
    rule.fit(stats, ["0", "1"])
    mu = np.stack([x[y == c].mean(0) for c in range(2)])
    cov = ((x - mu[y]).T @ (x - mu[y])) / len(x)
    rho = oas_shrinkage(torch.from_numpy(cov), len(x))
    shrunk = (1 - rho) * cov + rho * np.trace(cov) / 4 * np.eye(4)
    q = rng.normal(size=(3, 4))
    cls = np.array([0, 1, 1])
    d = q - mu[cls]
    expected = np.sqrt(np.einsum("bi,ij,bj->b", d, np.linalg.inv(shrunk), d))
    got = rule.terms({"a": host(rule.reduce("a", torch.from_numpy(q)))}, cls, np.zeros((3, 1)))
    got = got[:, 0]
    assert np.allclose(got, expected, rtol=1e-4)
    assert 0.0 <= rho <= 1.0


def _toy_fit(rule: str, folds: int, n: int = 60, seed: int = 0, options=None):
    """Two classes, two layers: features cluster by class; returns the fitted detector and the data."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    centers = np.array([[4.0, 0, 0], [0, 4.0, 0]])
    feats = {"a": torch.from_numpy(centers[y] + rng.normal(size=(n, 3))).float(),
             "b": torch.from_numpy(2 * centers[y] + rng.normal(size=(n, 3))).float()}
    spec = DetectorSpec(rule=rule, layer_names=("a", "b"), num_classes=2, loi_search_start=1, penultimate="a",
                        rule_options=options or {}, folds=folds)
    fitter = DetectorFitter(spec)
    for lo in range(0, n, 16):  # two passes, in batches
        fitter.update({k: v[lo:lo + 16] for k, v in feats.items()}, torch.from_numpy(y[lo:lo + 16]))
    fitter.fit()
    for lo in range(0, n, 16):
        fitter.update_out_of_fold({k: v[lo:lo + 16] for k, v in feats.items()}, torch.from_numpy(y[lo:lo + 16]))
    return fitter.detector(ThresholdPolicy()), feats, y


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_scores_an_outlier_below_benign(rule):
    det, feats, y = _toy_fit(rule, folds=3)
    benign = det.score(feats, torch.from_numpy(y))
    # an input predicted as class 1 whose first layer looks like class 0: what a backdoor does
    odd = {"a": torch.tensor([[4.0, 0.0, 0.0]]), "b": torch.tensor([[0.0, 8.0, 0.0]])}
    out = det.score(odd, torch.tensor([1]))
    assert float(out.scores[0]) < float(benign.scores[torch.from_numpy(y) == 1].min())
    assert bool(out.poisoned[0])
    item = out.items(det.layer_names, det.rule.term_names)[0]
    assert set(item) == {"poisoned", "score", "threshold", "layer_of_interest", "similarities", "terms"}
    assert set(item["similarities"]) == {"a", "b"}
    assert list(item["terms"]) == list(det.rule.term_names)
    # the artifact's arrays rebuild the same detector (what a worker loads)
    again = Detector.from_arrays(det.spec, det.arrays(), det.policy)
    assert np.allclose(again.score(odd, torch.tensor([1])).scores, out.scores, atol=1e-5)
    assert np.allclose(again.thresholds, det.thresholds)


def test_mahalanobis_diag_terms_match_numpy():
    """The second view: RMS over pooled features of (x - mu_k) / sd_k, sd_k^2 = half the class's own variance
    and half the pooled within-class variance; terms come after the Mahalanobis distances."""
    from layerguard.core.rules.mahalanobis_diag import DIAGONAL_SHRINKAGE

    rng = np.random.default_rng(2)
    y = np.repeat([0, 1, 2], 40)
    x = rng.normal(size=(120, 4)) * np.array([1.0, 2.0, 0.5])[y][:, None] + 3.0 * np.eye(4)[y]
    rule = create_rule("mahalanobis-diag", ("a",), 3)
    feats = {"a": torch.from_numpy(x).float()}
    stats = rule.new_statistics(feats)
    rule.update(stats, feats, torch.from_numpy(y))
    rule.fit(stats, ["0", "1", "2"])
    mu = np.stack([x[y == c].mean(0) for c in range(3)])
    own = np.stack([x[y == c].var(0) for c in range(3)])
    pooled = ((x - mu[y]) ** 2).mean(0)
    var = (1 - DIAGONAL_SHRINKAGE) * own + DIAGONAL_SHRINKAGE * pooled
    q = rng.normal(size=(5, 4))
    cls = np.array([0, 1, 2, 2, 1])
    expected = np.sqrt((((q - mu[cls]) ** 2) / var[cls]).mean(1))
    terms = rule.terms({"a": host(rule.reduce("a", torch.from_numpy(q)))}, cls, None)
    assert rule.term_names == ("a", "a/diagonal-z")
    assert terms.shape == (5, 2)
    assert np.allclose(terms[:, 1], expected, rtol=1e-4)


def test_penultimate_option_uses_one_layer():
    det, _, _ = _toy_fit("mahalanobis", folds=2, options={"layers": "penultimate"})
    assert det.rule.term_layers == ("a",)


def test_one_fold_is_in_sample_and_cross_fitting_scores_out_of_fold():
    """With one fold the references score against statistics they made (the notebook); with k folds each is
    scored by statistics fitted without it, so its out-of-fold similarity to its class is lower."""
    in_sample, _, _ = _toy_fit("cosine-loi", folds=1, n=20)
    cross, _, _ = _toy_fit("cosine-loi", folds=5, n=20)
    assert cross.sim_mean.mean() < in_sample.sim_mean.mean()
    assert in_sample.counts.tolist() == [10, 10] and cross.counts.tolist() == [10, 10]


def test_merged_shards_fit_the_same_detector():
    det_whole, feats, y = _toy_fit("mahalanobis", folds=2, n=40)
    spec = det_whole.spec
    a, b = DetectorFitter(spec), DetectorFitter(spec)
    a.update({k: v[:16] for k, v in feats.items()}, torch.from_numpy(y[:16]))
    b.update({k: v[16:] for k, v in feats.items()}, torch.from_numpy(y[16:]))
    a.merge(b)
    a.fit()
    for lo in range(0, 40, 16):  # the second pass, as _toy_fit makes it
        a.update_out_of_fold({k: v[lo:lo + 16] for k, v in feats.items()}, torch.from_numpy(y[lo:lo + 16]))
    merged, whole = a.detector(ThresholdPolicy()).rule.arrays(), det_whole.rule.arrays()
    for key in ("mean/a", "precision/a", "term_mean", "term_std"):
        assert np.allclose(merged[key], whole[key], atol=1e-4), key


def test_nan_and_constant_features_are_refused_naming_layer_and_class():
    spec = DetectorSpec(rule="mahalanobis", layer_names=("a",), num_classes=2, loi_search_start=0,
                        penultimate="a", folds=1)
    fitter = DetectorFitter(spec, ["cat", "dog"])
    bad = torch.ones(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(FitError, match="layer a .*class dog"):
        fitter.update({"a": bad}, torch.tensor([0, 0, 1, 1]))
    fitter = DetectorFitter(spec, ["cat", "dog"])
    fitter.update({"a": torch.ones(4, 3)}, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(FitError, match="layer a: the pooled features are constant"):
        fitter.fit()


def test_rule_registry_and_options_refuse_unknown_names():
    with pytest.raises(ValueError, match="known rules"):
        create_rule("nope", ("a",), 2)
    with pytest.raises(ValueError, match="no option"):
        create_rule("mahalanobis", ("a",), 2, {"colour": "red"})
    with pytest.raises(ValueError, match="penultimate"):
        create_rule("mahalanobis", ("a",), 2, {"layers": "some"})
    assert parse_rule_options(["layers=penultimate"]) == {"layers": "penultimate"}
    with pytest.raises(ValueError):
        parse_rule_options(["layers"])


def test_out_of_range_prediction_is_refused():
    det, _, _ = _toy_fit("cosine-loi", folds=2)
    with pytest.raises(ValueError):
        det.score({"a": torch.ones(1, 3), "b": torch.ones(1, 3)}, torch.tensor([5]))


def test_mahalanobis_has_one_threshold_cosine_one_per_class():
    maha, _, _ = _toy_fit("mahalanobis", folds=2)
    cos, _, _ = _toy_fit("cosine-loi", folds=2)
    assert np.allclose(maha.thresholds, maha.thresholds[0]) and not maha.benign.per_class
    assert cos.benign.per_class and not np.allclose(cos.thresholds, cos.thresholds[0])


def test_references_are_scored_as_serving_scores_them_for_global_thresholds():
    """A reference the model misreads is scored against the predicted class (as serving will score it) by
    a rule with one threshold; rules with per-class thresholds keep each class's own images."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    feats = {"a": torch.from_numpy(np.array([[4.0, 0, 0], [0, 4.0, 0]])[y] + rng.normal(size=(40, 3))).float()}
    predicted = torch.from_numpy(y.copy())
    predicted[0] = 1  # the model misreads one benign 0 as a 1
    for rule, expect_scored_as in (("mahalanobis", predicted.numpy()), ("cosine-loi", y)):
        spec = DetectorSpec(rule=rule, layer_names=("a",), num_classes=2, loi_search_start=0, penultimate="a",
                            folds=2)
        fitter = DetectorFitter(spec)
        fitter.update(feats, torch.from_numpy(y))
        fitter.fit()
        fitter.update_out_of_fold(feats, torch.from_numpy(y), predicted)
        det = fitter.detector(ThresholdPolicy())
        assert sorted(det.benign.labels.tolist()) == sorted(expect_scored_as.tolist()), rule


@pytest.mark.parametrize("name", ["mahalanobis", "mahalanobis-diag"])
def test_mahalanobis_packed_layers_match_layer_by_layer(monkeypatch, name):
    """Serving scores all layers as one block-diagonal matrix when they are narrow (for mahalanobis-diag, both
    views from one difference and one layer-sum matmul); wide ones one matmul per layer on its slice of the
    difference. Both must give the same terms (layers of different widths, classes in any order)."""
    from layerguard.core.rules import mahalanobis

    gen = torch.Generator().manual_seed(3)
    widths = {"a": 3, "b": 5, "c": 3, "d": 2}
    feats = {n: torch.randn(80, w, generator=gen) + 2.0 * (torch.arange(80) % 4)[:, None] for n, w in widths.items()}
    labels = torch.arange(80) % 4
    rule = create_rule(name, tuple(widths), 4)
    stats = rule.new_statistics(feats)
    rule.update(stats, feats, labels)
    rule.fit(stats, [str(c) for c in range(4)])
    query = {n: host(rule.reduce(n, torch.randn(7, w, generator=gen))) for n, w in widths.items()}
    classes = np.array([3, 0, 1, 1, 2, 0, 3])
    packed = rule.terms(query, classes, None)
    monkeypatch.setattr(mahalanobis, "PACKED_MAX_WIDTH", 0)  # every layer set is now "too wide" to pack
    layered = create_rule(name, tuple(widths), 4)
    layered.load_arrays(rule.arrays())
    by_layer = layered.terms(query, classes, None)
    assert packed.shape == (7, len(rule.term_names))
    assert np.allclose(packed, by_layer, rtol=1e-5, atol=1e-5)
    # and both are the definition: per layer, sqrt((x - mu_k)^T P (x - mu_k)) with k the given class
    for j, n in enumerate(widths):
        diff = query[n] - rule.means[n][classes]
        expected = np.sqrt(((diff @ rule.precisions[n]) * diff).sum(axis=1))
        assert np.allclose(by_layer[:, j], expected, rtol=1e-5, atol=1e-5), n


def test_mahalanobis_diag_combination_is_the_sum_of_standardised_views():
    """The folded-constant combination equals its definition: (S_maha - m1) / s1 + (S_diag - m2) / s2, with
    S_maha = -sum_l (t_l - mean_l) / std_l and S_diag = -max_l (z_l - diag_mean_l) / diag_std_l."""
    rng = np.random.default_rng(4)
    rule = create_rule("mahalanobis-diag", ("a", "b", "c"), 2)
    terms = np.abs(rng.normal(2.0, 1.0, size=(200, 6)))
    rule.fit_combination(terms, np.zeros(200, dtype=np.int64), np.zeros(2, dtype=np.int64))
    query = np.abs(rng.normal(2.0, 1.5, size=(9, 6)))
    s_maha = -((query[:, :3] - rule.term_mean) / rule.term_std).sum(1)
    s_diag = -((query[:, 3:] - rule.diag_mean) / rule.diag_std).max(1)
    m1, s1, m2, s2 = rule.view_stats
    expected = (s_maha - m1) / s1 + (s_diag - m2) / s2
    got = rule.combine(query.astype(np.float32), np.zeros(9, dtype=np.int64))
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4)
    # out of fold the two standardised views have mean 0: the combined benign score is centred
    assert abs(float(rule.combine(terms.astype(np.float32), np.zeros(200, dtype=np.int64)).mean())) < 1e-3


def test_fpr_spread_matches_simulated_thresholds():
    """The spread calibrate prints is the real one: thresholds inferred from n benign references (normal
    scores) deliver an FPR whose mean is the target and whose std is fpr_spread(target, n)."""
    from math import erf, sqrt

    from layerguard.core.thresholds import fpr_spread, references_for_spread

    rng = np.random.default_rng(0)
    n, target = 1000, 0.01
    delivered = []
    for _ in range(1000):
        scores = rng.normal(size=n)
        t = BenignScores(scores, np.zeros(n, dtype=np.int64), 1, per_class=False).thresholds(
            ThresholdPolicy(target_fpr=target))[0]
        delivered.append(0.5 * (1 + erf(t / sqrt(2))))  # the true FPR of threshold t on N(0, 1) traffic
    delivered = np.array(delivered)
    assert abs(delivered.mean() - target) < 0.0006
    assert abs(delivered.std() - fpr_spread(target, n)) < 0.0006
    assert abs(fpr_spread(0.01, 1000) - 0.00315) < 1e-5
    assert references_for_spread(0.01, 0.0025) == 1584


def test_binomial_cdf_matches_exact_sum():
    from math import comb

    from layerguard.core.thresholds import binomial_cdf

    for n, p, k in [(50, 0.1, 3), (200, 0.01, 0), (2000, 0.01, 12), (2000, 0.01, 20)]:
        exact = sum(comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1))
        assert binomial_cdf(k, n, p) == pytest.approx(exact, rel=1e-9)
    assert binomial_cdf(-1, 10, 0.5) == 0.0 and binomial_cdf(10, 10, 0.5) == 1.0


def test_fpr_confidence_bounds_the_delivered_rate_with_that_probability():
    """With fpr_confidence 0.9, thresholds from 1000 normal benign references deliver an FPR above the target in
    at most about 10% of draws (against about half without it), and flag fewer references than the target."""
    from math import erf, sqrt

    from layerguard.core.thresholds import flagged_references, references_for_confidence

    rng = np.random.default_rng(1)
    n, target = 1000, 0.01
    over = {None: [], 0.9: []}
    for _ in range(600):
        benign = BenignScores(rng.normal(size=n), np.zeros(n, dtype=np.int64), 1, per_class=False)
        for confidence in over:
            t = benign.thresholds(ThresholdPolicy(target_fpr=target, confidence=confidence))[0]
            over[confidence].append(0.5 * (1 + erf(t / sqrt(2))) > target)
    assert 0.35 < np.mean(over[None]) < 0.65
    assert 0.04 < np.mean(over[0.9]) <= 0.13  # the bound is exact up to the midway cut and sampling
    k = flagged_references(target, n, 0.9)
    assert 0 < k < flagged_references(target, n)
    assert references_for_confidence(0.01, 0.95) == 299
    with pytest.raises(ValueError, match="at least 299"):
        flagged_references(0.01, 298, 0.95)
    assert flagged_references(0.01, 299, 0.95) == 0


def test_fpr_confidence_policy_round_trip_and_validation():
    policy = ThresholdPolicy.from_options(None, 0.02, 0.95)
    assert policy.as_dict() == {"target_fpr": 0.02, "fpr_confidence": 0.95}
    assert ThresholdPolicy.from_dict(policy.as_dict()) == policy
    assert "95% confidence" in policy.describe()
    with pytest.raises(ValueError, match="not to tau"):
        ThresholdPolicy.from_options(2.5, None, 0.95)
    with pytest.raises(ValueError, match="fpr_confidence must be"):
        ThresholdPolicy(target_fpr=0.01, confidence=0.3)


def _feature_maps(n: int, seed: int, texture: float = 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two classes, a 4x4 feature map layer "m" (class-dependent means and spatial spread) and a vector layer
    "v" (no spatial extent); `texture` scales the spatial variation around each channel's mean."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    base = torch.tensor([[3.0, 0.0, 1.0], [0.0, 3.0, 1.0]])[y]  # [n, 3] channel means
    jitter = 1.0 + 0.15 * torch.randn(n, 3, generator=gen)
    spread = torch.tensor([[1.0, 0.5, 2.0], [0.5, 1.0, 2.0]])[y] * texture * jitter
    noise = torch.randn(n, 3, 4, 4, generator=gen)
    noise = (noise - noise.mean(dim=(2, 3), keepdim=True)) / noise.std(dim=(2, 3), correction=0, keepdim=True)
    maps = base[:, :, None, None] + spread[:, :, None, None] * noise + 0.1 * torch.randn(n, 3, 1, 1, generator=gen)
    vec = 2.0 * torch.nn.functional.one_hot(y, 2).float() + 0.3 * torch.randn(n, 2, generator=gen)
    return {"m": maps, "v": vec}, y


def test_mahalanobis_spread_terms_match_numpy():
    """The third view's term per spatial layer: RMS over channels of (spread - mu_k) / sd_k, spread = the
    channel's spatial standard deviation, sd_k^2 half the class's own variance and half the pooled one; a layer
    without spatial extent (the vector "v") gets no spread term."""
    from layerguard.core.rules.mahalanobis_diag import DIAGONAL_SHRINKAGE

    feats, y = _feature_maps(80, seed=5)
    rule = create_rule("mahalanobis-spread", ("m", "v"), 2)
    stats = rule.new_statistics(feats)
    rule.update(stats, feats, y)
    rule.fit(stats, ["0", "1"])
    assert rule.spread_layers == ("m",)
    assert rule.term_names == ("m", "v", "m/diagonal-z", "v/diagonal-z", "m/spread-z")
    s = feats["m"].flatten(2).std(dim=2, correction=0).double().numpy()
    yn = y.numpy()
    mu = np.stack([s[yn == c].mean(0) for c in range(2)])
    own = np.stack([s[yn == c].var(0) for c in range(2)])
    var = (1 - DIAGONAL_SHRINKAGE) * own + DIAGONAL_SHRINKAGE * ((s - mu[yn]) ** 2).mean(0)
    query, _ = _feature_maps(6, seed=6, texture=1.7)
    cls = np.array([0, 1, 1, 0, 1, 0])
    reduced = {n: rule.reduce(n, t) for n, t in query.items()}
    mean, norm, positions = reduced["m"]  # a feature map's hook keeps its channels' mean and L2 norm
    assert torch.allclose(mean, pool(query["m"]), atol=1e-6) and reduced["v"].shape == (6, 2)
    assert torch.allclose(norm, (query["m"] ** 2).sum(dim=(2, 3)).sqrt(), rtol=1e-5) and positions == 16
    channels_last = rule.reduce("m", query["m"].contiguous(memory_format=torch.channels_last))
    assert torch.allclose(channels_last[1], norm, rtol=1e-5)  # the other reduction path, same numbers
    terms = rule.terms({n: host(r) for n, r in reduced.items()}, cls, None)
    qs = query["m"].flatten(2).std(dim=2, correction=0).double().numpy()
    expected = np.sqrt((((qs - mu[cls]) ** 2) / var[cls]).mean(1))
    assert terms.shape == (6, 5)
    assert np.allclose(terms[:, 4], expected, rtol=1e-4)
    # the first four terms are mahalanobis-diag's, on the pooled part alone
    diag = create_rule("mahalanobis-diag", ("m", "v"), 2)
    diag.fit(stats, ["0", "1"])
    assert np.allclose(terms[:, :4], diag.terms({n: host(diag.reduce(n, t)) for n, t in query.items()}, cls, None),
                       rtol=1e-5, atol=1e-5)
    # a vector layer before the feature map: the spread features are no longer a prefix of the pooled ones
    swapped = create_rule("mahalanobis-spread", ("v", "m"), 2)
    swapped_stats = swapped.new_statistics(feats)
    swapped.update(swapped_stats, feats, y)
    swapped.fit(swapped_stats, ["0", "1"])
    swapped_terms = swapped.terms({n: host(swapped.reduce(n, t)) for n, t in query.items()}, cls, None)
    assert np.allclose(swapped_terms[:, 4], expected, rtol=1e-4)


def test_mahalanobis_spread_combination_is_the_sum_of_three_standardised_views():
    """score = mahalanobis-diag's two standardised views + (S_spread - m3) / s3, S_spread = -max_l of the
    spread terms standardised per layer; out of fold the benign scores are centred."""
    rng = np.random.default_rng(7)
    rule = create_rule("mahalanobis-spread", ("a", "b", "c"), 2)
    rule._set_spread_layers(("a", "b"))
    terms = np.abs(rng.normal(2.0, 1.0, size=(300, 8)))
    rule.fit_combination(terms, np.zeros(300, dtype=np.int64), np.zeros(2, dtype=np.int64))
    query = np.abs(rng.normal(2.0, 1.5, size=(9, 8)))
    s_maha = -((query[:, :3] - rule.term_mean) / rule.term_std).sum(1)
    s_diag = -((query[:, 3:6] - rule.diag_mean) / rule.diag_std).max(1)
    s_spread = -((query[:, 6:] - rule.spread_term_mean) / rule.spread_term_std).max(1)
    m1, s1, m2, s2 = rule.view_stats
    m3, s3 = rule.spread_view
    expected = (s_maha - m1) / s1 + (s_diag - m2) / s2 + (s_spread - m3) / s3
    got = rule.combine(query.astype(np.float32), np.zeros(9, dtype=np.int64))
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert abs(float(rule.combine(terms.astype(np.float32), np.zeros(300, dtype=np.int64)).mean())) < 1e-3


def test_mahalanobis_spread_sees_a_texture_change_the_pooled_views_miss():
    """An input whose channel means are its class's but whose feature map is twice as uneven (what a warping
    trigger does to texture): mahalanobis-diag scores it like benign, mahalanobis-spread flags it. The artifact's
    arrays rebuild the same detector, and a feature map of the wrong width is refused with a clear error."""
    feats, y = _feature_maps(120, seed=8)
    query, _ = _feature_maps(20, seed=9, texture=2.0)
    classes = torch.arange(20) % 2
    flagged = {}
    for name in ("mahalanobis-diag", "mahalanobis-spread"):
        spec = DetectorSpec(rule=name, layer_names=("m", "v"), num_classes=2, loi_search_start=1, penultimate="v",
                            folds=4)
        fitter = DetectorFitter(spec)
        fitter.update(feats, y)
        fitter.fit()
        fitter.update_out_of_fold(feats, y)
        det = fitter.detector(ThresholdPolicy(target_fpr=0.05))
        flagged[name] = float(det.score(query, classes).poisoned.mean())
    assert flagged["mahalanobis-spread"] >= 0.9 and flagged["mahalanobis-diag"] <= 0.3
    # the hooks take each map's norm from its channels' norms: the similarities are the profile's own
    shared = det.score(query, classes).similarities
    assert np.allclose(shared, det.profile.similarities(query, classes).numpy(), atol=1e-5)
    assert det.rule.output_norms("v", query["v"]) is None  # a vector layer: the profile computes its norm
    again = Detector.from_arrays(det.spec, det.arrays(), det.policy)
    assert again.rule.spread_layers == ("m",)
    assert np.allclose(again.score(query, classes).scores, det.score(query, classes).scores, atol=1e-5)
    with pytest.raises(ValueError, match="layer m was calibrated on a feature map, but returned shape"):
        again.rule.reduce("m", torch.ones(2, 3))
    with pytest.raises(ValueError, match="layer m: expected the moments of a feature map of 3 channels, got 4"):
        again.rule.terms({"m": (np.ones((2, 4)), np.ones((2, 4)), 16), "v": np.ones((2, 2))}, np.array([0, 1]), None)


def test_mahalanobis_nearest_reference_is_the_smallest_class_distance():
    """`reference: nearest` (Lee et al.'s form) scores each layer against the closest class mean, whatever the
    predicted class; `mahalanobis-diag` keeps its second view against the predicted class."""
    gen = torch.Generator().manual_seed(5)
    widths = {"a": 3, "b": 5, "c": 3}
    feats = {n: torch.randn(60, w, generator=gen) + 3.0 * (torch.arange(60) % 3)[:, None] for n, w in widths.items()}
    labels = torch.arange(60) % 3
    query = {n: torch.randn(6, w, generator=gen) * 2.0 for n, w in widths.items()}
    classes = np.array([0, 1, 2, 2, 1, 0])
    for name in ("mahalanobis", "mahalanobis-diag"):
        rule = create_rule(name, tuple(widths), 3, {"reference": "nearest"})
        stats = rule.new_statistics(feats)
        rule.update(stats, feats, labels)
        rule.fit(stats, ["0", "1", "2"])
        terms = rule.terms({n: host(rule.reduce(n, q)) for n, q in query.items()}, classes, None)
        for j, n in enumerate(widths):
            diff = query[n].numpy()[:, None, :] - rule.means[n][None]  # [B, C, D]
            every = np.einsum("bcd,de,bce->bc", diff, rule.precisions[n], diff)
            assert np.allclose(terms[:, j], np.sqrt(every.min(axis=1)), rtol=1e-4, atol=1e-4), (name, n)
        if name == "mahalanobis-diag":
            z = (query["b"].numpy() - rule.means["b"][classes]) * rule.inv_sd["b"][classes]
            assert np.allclose(terms[:, len(widths) + 1], np.sqrt((z * z).mean(axis=1)), rtol=1e-4, atol=1e-4)


def test_many_class_cosine_keeps_features_that_a_later_in_place_op_cannot_change():
    """With more classes than one matmul against every centroid is worth, the hook keeps the flattened output
    for the dot product with the predicted class's centroid after the forward pass. That output may be changed
    in place later in the same pass (here `add_`): the similarities must still be those of what the layer
    returned."""
    from torch import nn

    from layerguard.core.capture import LayerCapture
    from layerguard.core.similarity import MATMUL_MAX_CLASSES, CosineProfile

    classes = MATMUL_MAX_CLASSES + 6

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Linear(4, 6), nn.Linear(6, classes)

        def forward(self, x):
            h = self.a(x)
            out = self.fc(h)
            h.add_(1.0)  # after the hook ran: the kept features must not see this
            return out

    torch.manual_seed(0)
    net = Net()
    gen = torch.Generator().manual_seed(1)
    profile = CosineProfile(("a",), {"a": torch.randn(classes, 6, generator=gen)})
    x = torch.randn(5, 4, generator=gen)
    cls = torch.tensor([0, 3, 7, classes - 1, 2])
    with LayerCapture(net, ("a",), reducer=profile.reduce) as capture:
        _, features = capture.run(x)
    got = profile.similarities_from(features, cls)
    with torch.no_grad():
        expected = profile.similarities({"a": net.a(x)}, cls)
    assert torch.allclose(got, expected, atol=1e-6)


def test_shrunk_class_moments_halve_own_and_pooled_variance():
    """mu_k is the class mean; sd_k^2 half the class's own variance and half the pooled within-class one; a
    class with no reference gets the pooled mean and spread (never a zero sd)."""
    from layerguard.core.rules.mahalanobis_spread_loi import shrunk_class_moments

    values = np.array([1.0, 3.0, 10.0, 14.0, 12.0])
    classes = np.array([0, 0, 1, 1, 1])
    mean, inv_sd = shrunk_class_moments(values, classes, 3)
    own = np.array([1.0, 8.0 / 3.0])
    pooled = (1 + 1 + 4 + 4 + 0) / 5
    assert np.allclose(mean[:2], [2.0, 12.0]) and mean[2] == pytest.approx(values.mean())
    assert np.allclose(1 / inv_sd[:2] ** 2, 0.5 * own + 0.5 * pooled)
    assert 1 / inv_sd[2] ** 2 == pytest.approx(pooled)


def test_mahalanobis_spread_loi_adds_the_papers_score_as_a_fourth_view():
    """score = mahalanobis-spread's score + ((s - mu_k) / sd_k - m4) / s4, s the sum of the similarities to
    the predicted class k over its window LOI_k-2..LOI_k (the paper's score); terms end with the similarities."""
    from layerguard.core.rules.mahalanobis_spread_loi import shrunk_class_moments

    rng = np.random.default_rng(11)
    layers = ("a", "b", "c", "d")
    rule = create_rule("mahalanobis-spread-loi", layers, 3)
    spread = create_rule("mahalanobis-spread", layers, 3)
    for r in (rule, spread):
        r._set_spread_layers(("a", "b"))
    assert rule.term_names == spread.term_names + ("a/cosine", "b/cosine", "c/cosine", "d/cosine")
    n, k_spread = 400, len(spread.term_names)
    labels = rng.integers(0, 3, n)
    sims = rng.uniform(0.2, 0.9, size=(n, 4)) + 0.1 * labels[:, None]
    base = np.abs(rng.normal(2.0, 1.0, size=(n, k_spread)))
    loi = np.array([3, 2, 1])
    rule.fit_combination(np.c_[base, sims], labels, loi)
    spread.fit_combination(base, labels, loi)
    q_cls = np.array([0, 1, 2, 2, 0])
    q_base = np.abs(rng.normal(2.0, 1.5, size=(5, k_spread))).astype(np.float32)
    q_sims = rng.uniform(0.0, 0.9, size=(5, 4)).astype(np.float32)
    window = window_matrix(4)[loi]
    s_ref = (sims * window[labels]).sum(1)
    mu, inv_sd = shrunk_class_moments(s_ref, labels, 3)
    z_ref = (s_ref - mu[labels]) * inv_sd[labels]
    z = ((q_sims * window[q_cls]).sum(1) - mu[q_cls]) * inv_sd[q_cls]
    expected = spread.combine(q_base, q_cls) + (z - z_ref.mean()) / z_ref.std()
    got = rule.combine(np.c_[q_base, q_sims].astype(np.float32), q_cls)
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the view is centred on the references, so the whole score stays centred
    assert abs(float(rule.combine(np.c_[base, sims].astype(np.float32), labels).mean())) < 1e-3
    # a lower similarity in the window lowers the score; outside the window it changes nothing
    lower = q_sims.copy()
    lower[0, 3] -= 0.5  # class 0's LOI is layer 3: in its window
    lower[1, 3] -= 0.5  # class 1's window is layers 0..2
    moved = rule.combine(np.c_[q_base, lower].astype(np.float32), q_cls)
    assert moved[0] < got[0] and moved[1] == pytest.approx(got[1])
    # terms carry the similarities, and refuse to go without them
    with pytest.raises(ValueError, match="scores the cosine similarities"):
        rule.terms({}, q_cls, None)


def test_mahalanobis_spread_loi_computes_similarities_for_compact_responses():
    """A rule built on the cosine profile gets it even where the response leaves it out (compact), through
    both reduction paths, and a saved detector scores the same."""
    feats, y = _feature_maps(120, seed=8)
    spec = DetectorSpec(rule="mahalanobis-spread-loi", layer_names=("m", "v"), num_classes=2, loi_search_start=1,
                        penultimate="v", folds=4)
    fitter = DetectorFitter(spec)
    fitter.update(feats, y)
    fitter.fit()
    fitter.update_out_of_fold(feats, y)
    det = fitter.detector(ThresholdPolicy())
    query, _ = _feature_maps(6, seed=9, texture=2.0)
    classes = torch.arange(6) % 2
    full = det.score(query, classes)
    reduce = det.reducer(similarities=False)
    compact = det.score_reduced({n: reduce(n, query[n]) for n in det.layer_names}, classes)
    kept = det.score_outputs(query, classes, similarities=False)
    for other in (compact, kept):
        assert np.allclose(other.scores, full.scores, atol=1e-5)
        assert other.similarities is not None
    again = Detector.from_arrays(det.spec, det.arrays(), det.policy)
    assert np.allclose(again.score(query, classes).scores, full.scores, atol=1e-5)
    assert np.array_equal(again.rule.loi, det.loi)
