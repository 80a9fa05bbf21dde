"""Calibration on small cases computed by hand: NLL, Brier, top-label ECE (15 bins), the ensemble's spread and
disagreement, selective accuracy, and the reliability diagram."""

import math

import numpy as np
import pytest
import torch

from dist_subspace.evaluation import calibration as cal

# Confidences 0.95, 0.75, 0.65, 0.55: each in its own bin of width 1/15 (bins 14, 11, 9, 8), away from the edges.
PROBS = np.array([[0.95, 0.05], [0.25, 0.75], [0.65, 0.35], [0.45, 0.55]])
LABELS = np.array([0, 0, 0, 1])  # right, wrong, right, right


def test_nll_is_the_mean_negative_log_probability_of_the_label():
    want = -(math.log(0.95) + math.log(0.25) + math.log(0.65) + math.log(0.55)) / 4
    assert cal.negative_log_likelihood(PROBS, LABELS) == pytest.approx(want, abs=1e-12)
    assert cal.negative_log_likelihood(torch.tensor(PROBS, dtype=torch.float32), torch.tensor(LABELS)) == (
        pytest.approx(want, abs=1e-6)
    )


def test_brier_is_the_binary_squared_error_and_the_multiclass_sum():
    # Two classes: mean (p(class 1) - y)^2.
    want = (0.05**2 + 0.75**2 + 0.35**2 + 0.45**2) / 4
    assert cal.brier_score(PROBS, LABELS) == pytest.approx(want, abs=1e-12)
    # Three classes: mean over examples of the sum over classes of (p_c - [y = c])^2.
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    want = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.9**2 + 0.8**2)) / 2
    assert cal.brier_score(probs, [0, 1]) == pytest.approx(want, abs=1e-12)


def test_ece_over_15_equal_width_bins_of_top_label_confidence():
    # One example a bin: ECE = mean |correct - confidence|.
    assert cal.expected_calibration_error(PROBS, LABELS) == pytest.approx((0.05 + 0.75 + 0.35 + 0.45) / 4)
    # Two examples share bin (0.6, 0.667]: their accuracy 0.5 against their mean confidence 0.63.
    probs = np.array([[0.62, 0.38], [0.36, 0.64], [0.05, 0.95]])
    labels = np.array([0, 0, 1])  # right, wrong, right
    want = 2 / 3 * abs(0.5 - 0.63) + 1 / 3 * abs(1 - 0.95)
    assert cal.expected_calibration_error(probs, labels) == pytest.approx(want)
    table = cal.reliability_bins(probs, labels)
    assert table["count"].sum() == 3 and table["count"][9] == 2 and table["count"][14] == 1
    assert len(table["edges"]) == 16 and np.isnan(table["accuracy"][0])
    assert cal.expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 1]) == 0.0  # sure and right


def test_a_confidence_on_an_interior_bin_edge_falls_in_the_bin_below():
    # Bin b is (b / 15, (b + 1) / 15]: a confidence of exactly 2/3 = 10/15 (the float np.linspace gives, kept by
    # the renormalisation) closes bin 9, (0.6, 0.667], beside 0.64; it is not the first of bin 10.
    probs = np.array([[2 / 3, 1 / 3], [0.36, 0.64]])
    labels = np.array([1, 1])  # wrong, right
    assert probs[0, 0] == np.linspace(0.0, 1.0, 16)[10]
    table = cal.reliability_bins(probs, labels)
    assert table["count"][9] == 2 and table["count"][10] == 0
    want = abs(0.5 - (2 / 3 + 0.64) / 2)  # one bin: accuracy 1/2 against mean confidence 0.6533
    assert cal.expected_calibration_error(probs, labels) == pytest.approx(want, abs=1e-12)
    # The other convention, [b / 15, (b + 1) / 15), would give 1/2 * |0 - 2/3| + 1/2 * |1 - 0.64| = 0.5133.
    assert cal.expected_calibration_error(probs, labels) != pytest.approx(0.5 * 2 / 3 + 0.5 * 0.36)


def test_ece_of_four_classes_is_top_label():
    # Confidence is the largest of the 4 probabilities, right when its class is the label (not p(label), not p(1)).
    probs = np.array(
        [
            [0.45, 0.25, 0.20, 0.10],  # confidence 0.45 (bin 6, (0.4, 0.467]), says 0, label 1: wrong
            [0.10, 0.15, 0.70, 0.05],  # 0.70 (bin 10, (0.667, 0.733]), says 2, label 2: right
            [0.30, 0.35, 0.05, 0.30],  # 0.35 (bin 5, (0.333, 0.4]), says 1, label 1: right
            [0.05, 0.05, 0.18, 0.72],  # 0.72 (bin 10), says 3, label 2: wrong
        ]
    )
    labels = np.array([1, 2, 1, 2])
    # Bin 5: 1/4 * |1 - 0.35|; bin 6: 1/4 * |0 - 0.45|; bin 10: 2/4 * |1/2 - (0.70 + 0.72) / 2| = 1/2 * 0.21.
    want = 0.25 * 0.65 + 0.25 * 0.45 + 0.5 * 0.21
    assert want == pytest.approx(0.38)
    assert cal.expected_calibration_error(probs, labels) == pytest.approx(want, abs=1e-12)
    table = cal.reliability_bins(probs, labels)
    assert table["count"][[5, 6, 10]].tolist() == [1, 1, 2] and table["count"].sum() == 4
    np.testing.assert_allclose(table["accuracy"][[5, 6, 10]], [1.0, 0.0, 0.5])
    np.testing.assert_allclose(table["confidence"][[5, 6, 10]], [0.35, 0.45, 0.71])


def test_ensemble_spread_and_disagreement():
    # S = 4 points, 2 examples: example 0's ensemble says class 0 (mean 0.6) with one point against it.
    points = np.array(
        [
            [[0.9, 0.1], [0.2, 0.8]],
            [[0.7, 0.3], [0.3, 0.7]],
            [[0.6, 0.4], [0.1, 0.9]],
            [[0.2, 0.8], [0.4, 0.6]],
        ]
    )
    out = cal.ensemble_uncertainty(points)
    np.testing.assert_allclose(out["probs"], [[0.6, 0.4], [0.25, 0.75]])
    assert out["label"].tolist() == [0, 1]
    np.testing.assert_allclose(out["disagreement"], [0.25, 0.0])
    np.testing.assert_allclose(
        out["spread"], [np.std([0.9, 0.7, 0.6, 0.2], ddof=1), np.std([0.8, 0.7, 0.9, 0.6], ddof=1)]
    )
    assert cal.ensemble_uncertainty(points[:1])["spread"].tolist() == [0.0, 0.0]  # one point: no spread


def test_selective_accuracy_ranks_by_disagreement_then_ensemble_confidence_against_the_centroid():
    """5 examples, S = 2, coverage 0.8 keeps 4. The ensemble is wrong on example 4 only. The points disagree on
    examples 3 and 4 (a tie), broken by the ensemble's confidence (0.625 against 0.55): disagreement keeps 0-3.
    The centroid is least sure of example 0 and drops it, keeping the wrong example 4."""
    a = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.8, 0.2], [0.6, 0.4]]
    b = [[0.7, 0.3], [0.9, 0.1], [0.2, 0.8], [0.45, 0.55], [0.3, 0.7]]
    labels = [0, 0, 1, 0, 0]  # the ensemble says 0, 0, 1, 0, 1: wrong on the last
    centroid = [[0.51, 0.49], [0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.7, 0.3]]
    got = cal.selective_accuracies(np.array([a, b]), np.array(centroid), labels)
    assert got == {
        "selective_accuracy_disagreement": 1.0,
        "selective_accuracy_centroid": 0.75,
        "selective_coverage": 0.8,
    }
    assert cal.kept(5) == 4 and cal.kept(41) == 33 and cal.kept(1) == 1
    assert cal.selective_accuracy([1, 0, 1], [2, 0, 1], coverage=0.5) == 1.0  # keeps 2 of 3: examples 2 and 0
    with pytest.raises(ValueError, match="permutation"):
        cal.selective_accuracy([1, 0], [0, 0])


def test_mode_calibration_per_kind():
    logits = [torch.tensor(PROBS).log().float(), torch.tensor(PROBS[:, ::-1].copy()).log().float()]
    labels = torch.tensor(LABELS)
    one = cal.mode_calibration("centroid", logits[:1], labels)
    assert set(one) == {"nll", "brier", "ece"}
    assert one["ece"] == pytest.approx(cal.expected_calibration_error(PROBS, LABELS), abs=1e-6)
    sampled = cal.mode_calibration("sampled", logits, labels)
    other = cal.calibration_metrics(PROBS[:, ::-1], LABELS)
    assert sampled["nll"] == pytest.approx((one["nll"] + other["nll"]) / 2, abs=1e-6)
    assert sampled["nll_std"] == pytest.approx(abs(one["nll"] - other["nll"]) / math.sqrt(2), abs=1e-6)
    ensemble = cal.mode_calibration("ensemble", logits, labels, centroid_logits=logits[0])
    assert ensemble["nll"] == pytest.approx(math.log(2), abs=1e-6)  # the two points average to 0.5 everywhere
    assert {"selective_accuracy_disagreement", "selective_accuracy_centroid", "selective_coverage"} <= set(ensemble)
    assert "selective_coverage" not in cal.mode_calibration("ensemble", logits, labels)  # no centroid given


def test_reliability_diagram_is_a_png(tmp_path):
    logits = [torch.tensor(PROBS).log().float()] * 2
    path = cal.reliability_diagram("ensemble", logits, LABELS, tmp_path / "sub" / "r.png", "t", logits[0], "ens")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pooled = cal.reliability_diagram("sampled", logits, LABELS, tmp_path / "s.png")
    assert pooled.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
