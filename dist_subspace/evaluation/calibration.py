"""How well a classifier's probabilities are calibrated, and how the subspace's disagreement ranks its examples.

Pure functions of class probabilities ``[N, C]`` (or ``[S, N, C]``: S points of the simplex) and labels ``[N]``,
torch tensors or numpy arrays, computed in float64:

- negative log-likelihood (:func:`sklearn.metrics.log_loss`, probabilities clipped as it does);
- Brier score (:func:`sklearn.metrics.brier_score_loss` with every class named, scikit-learn >= 1.7): for two
  classes the customary ``mean (p(class 1) - y)^2`` in [0, 1], for more the sum over classes,
  ``mean sum_c (p_c - [y = c])^2``, in [0, 2];
- expected calibration error, top-label, over 15 equal-width bins of confidence: the confidence of an example is
  its largest probability, bin b holds the confidences in ``(b / 15, (b + 1) / 15]``, and
  ``ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|`` (Guo et al., 2017);
- for an ensemble of S points: each example's spread (sample SD over the S points of the probability of the
  ensemble's label) and disagreement (the share of the S points whose own argmax is not the ensemble's label),
  and the selective accuracy at a coverage (the accuracy on the examples a ranking is surest of).

matplotlib (object API on the Agg canvas) is imported only inside :func:`plot_reliability`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ECE_BINS = 15
COVERAGE = 0.8  # selective accuracy: the share of examples kept


def _array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values)


def _probs(probs) -> np.ndarray:
    """``[..., C]`` probabilities in float64, each row renormalised to sum to 1 (float32 softmax drifts by 1e-7)."""
    p = _array(probs).astype(np.float64)
    if p.ndim < 2 or p.shape[-1] < 2:
        raise ValueError(f"need class probabilities [..., C] with C >= 2, got shape {p.shape}")
    return p / p.sum(-1, keepdims=True)


def _labels(labels, n: int) -> np.ndarray:
    y = _array(labels).reshape(-1).astype(np.int64)
    if len(y) != n or n == 0:
        raise ValueError(f"need one label per example, at least one (got {len(y)} labels for {n} examples)")
    return y


def negative_log_likelihood(probs, labels) -> float:
    """Mean ``-log p(label)`` (natural log) over the examples."""
    from sklearn.metrics import log_loss

    p = _probs(probs)
    return float(log_loss(_labels(labels, len(p)), p, labels=list(range(p.shape[1]))))


def brier_score(probs, labels) -> float:
    """Brier score: ``mean (p(class 1) - y)^2`` for two classes, ``mean sum_c (p_c - [y = c])^2`` for more."""
    from sklearn.metrics import brier_score_loss

    p = _probs(probs)
    return float(brier_score_loss(_labels(labels, len(p)), p, labels=list(range(p.shape[1]))))


def reliability_bins(probs, labels, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Top-label reliability over ``bins`` equal-width bins of confidence (bin b: ``(b / bins, (b + 1) / bins]``):
    per bin the number of examples ``count``, their mean confidence ``confidence`` and their accuracy
    ``accuracy`` (both NaN for an empty bin), and the bin ``edges`` ``[bins + 1]``."""
    p = _probs(probs)
    y = _labels(labels, len(p))
    confidence, correct = p.max(-1), (p.argmax(-1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, confidence, minlength=bins) / count
        accuracy = np.bincount(which, correct, minlength=bins) / count
    return {"edges": edges, "count": count, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
    """Top-label ECE over ``bins`` equal-width bins: ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``."""
    table = reliability_bins(probs, labels, bins)
    full = table["count"] > 0
    gaps = np.abs(table["accuracy"][full] - table["confidence"][full])
    return float((table["count"][full] / table["count"].sum() * gaps).sum())


def calibration_metrics(probs, labels) -> dict[str, float]:
    """``{"nll", "brier", "ece"}`` of probabilities ``[N, C]`` against labels ``[N]``."""
    return {
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": expected_calibration_error(probs, labels),
    }


def ensemble_uncertainty(point_probs) -> dict[str, np.ndarray]:
    """S points' probabilities ``[S, N, C]`` -> the ensemble's ``probs`` ``[N, C]`` (their mean) and ``label``
    ``[N]`` (its argmax), ``spread`` ``[N]`` (sample SD over the S points of the probability of that label; 0
    when S = 1) and ``disagreement`` ``[N]`` (the share of the S points whose own argmax differs from it: one
    of 0, 1/S, ..., 1)."""
    stack = _probs(point_probs)
    if stack.ndim != 3:
        raise ValueError(f"need the S points' probabilities [S, N, C], got shape {stack.shape}")
    mean = stack.mean(0)
    label = mean.argmax(-1)
    own = np.take_along_axis(stack, label[None, :, None], axis=-1)[..., 0]  # [S, N]
    spread = own.std(0, ddof=1) if len(stack) > 1 else np.zeros(len(label))
    disagreement = (stack.argmax(-1) != label[None]).mean(0)
    return {"probs": mean, "label": label, "spread": spread, "disagreement": disagreement}


def kept(n: int, coverage: float = COVERAGE) -> int:
    """How many of ``n`` examples a coverage keeps: ``ceil(coverage * n)`` (at least 1)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    return max(1, math.ceil(coverage * n - 1e-9))


def selective_accuracy(correct, order: Sequence[int] | np.ndarray, coverage: float = COVERAGE) -> float:
    """The accuracy on the ``ceil(coverage * N)`` examples that come first in ``order`` (surest first)."""
    correct = _array(correct).astype(np.float64).reshape(-1)
    order = np.asarray(order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(len(correct))):
        raise ValueError(f"order must be a permutation of the {len(correct)} examples")
    return float(correct[order[: kept(len(correct), coverage)]].mean())


def selective_accuracies(point_probs, centroid_probs, labels, coverage: float = COVERAGE) -> dict[str, float]:
    """The ensemble's accuracy on the ``coverage`` share of examples it is surest of, ranked two ways:

    - ``selective_accuracy_disagreement``: by the subspace's disagreement (fewest of the S points against the
      ensemble's label first; ties broken by the ensemble's largest probability, then by example order);
    - ``selective_accuracy_centroid``: by the centroid's own confidence (its largest probability, highest first;
      ties by example order), the ranking one point gives without the subspace.

    Both score the ensemble's labels, so they differ only in which examples they keep; ``selective_coverage``
    is the share kept."""
    ensemble = ensemble_uncertainty(point_probs)
    centroid = _probs(centroid_probs)
    y = _labels(labels, len(ensemble["label"]))
    if centroid.shape != ensemble["probs"].shape:
        raise ValueError(f"the centroid's probabilities {centroid.shape} and the ensemble's differ in shape")
    correct = ensemble["label"] == y
    by_disagreement = np.lexsort((-ensemble["probs"].max(-1), ensemble["disagreement"]))  # last key is primary
    by_centroid = np.argsort(-centroid.max(-1), kind="stable")
    return {
        "selective_accuracy_disagreement": selective_accuracy(correct, by_disagreement, coverage),
        "selective_accuracy_centroid": selective_accuracy(correct, by_centroid, coverage),
        "selective_coverage": coverage,
    }


def mode_probabilities(kind: str, point_logits: Sequence[torch.Tensor]) -> np.ndarray:
    """The probabilities ``[N, C]`` a mode predicts with (``kind`` from ``check_eval_mode``): the one point's
    softmax for ``centroid``/``vertex``, the mean of the S points' for ``ensemble``, and for ``sampled``/``models``
    (S separate models) all S models' predictions pooled, ``[S * N, C]``."""
    probs = np.stack([_probs(torch.as_tensor(o).float().softmax(-1)) for o in point_logits])  # [S, N, C]
    if kind == "ensemble":
        return probs.mean(0)
    return probs.reshape(-1, probs.shape[-1])


def mode_calibration(
    kind: str,
    point_logits: Sequence[torch.Tensor],
    labels,
    centroid_logits: torch.Tensor | None = None,
    coverage: float = COVERAGE,
) -> dict[str, float]:
    """Calibration of a mode's probabilities from its points' class logits (``[N, C]`` each): ``nll``, ``brier``
    and ``ece`` of the one point (``centroid``, ``vertex``) or of the ensemble's mean probabilities
    (``ensemble``); for ``sampled``/``models`` their mean over the S models, with ``*_std`` (sample SD) as the
    metric has. With ``ensemble`` and the centroid's logits, also :func:`selective_accuracies`."""
    probs = [torch.as_tensor(o).float().softmax(-1) for o in point_logits]
    if kind in ("sampled", "models"):
        runs = [calibration_metrics(p, labels) for p in probs]
        result = {}
        for key in runs[0]:
            values = np.array([r[key] for r in runs])
            result[key] = float(values.mean())
            result[f"{key}_std"] = float(values.std(ddof=1)) if len(runs) > 1 else 0.0
        return result
    if kind != "ensemble":
        return calibration_metrics(probs[0], labels)
    stack = torch.stack(probs)
    result = calibration_metrics(stack.double().mean(0), labels)
    if centroid_logits is not None:
        centroid = torch.as_tensor(centroid_logits).float().softmax(-1)
        result.update(selective_accuracies(stack, centroid, labels, coverage))
    return result


def plot_reliability(
    probs,
    labels,
    path: str | Path,
    title: str = "",
    reference=None,
    reference_name: str = "centroid",
    name: str = "model",
    bins: int = ECE_BINS,
) -> Path:
    """A reliability diagram PNG: accuracy per confidence bin (bars) against the diagonal of perfect
    calibration, the ECE in the legend; ``reference`` (probabilities ``[N, C]``, e.g. the centroid's beside an
    ensemble's) is drawn over it as a line. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    table = reliability_bins(probs, labels, bins)
    width = 1.0 / bins
    full = table["count"] > 0
    ece = expected_calibration_error(probs, labels, bins)
    ax.bar(
        table["edges"][:-1][full],
        table["accuracy"][full],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.75,
        label=f"{name} (ECE {ece:.3f})",
    )
    if reference is not None:
        ref = reliability_bins(reference, labels, bins)
        seen = ref["count"] > 0
        ref_ece = expected_calibration_error(reference, labels, bins)
        label = f"{reference_name} (ECE {ref_ece:.3f})"
        ax.plot(ref["confidence"][seen], ref["accuracy"][seen], "o-", color="tab:red", label=label)
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    low = max(0.0, (1.0 / _probs(probs).shape[-1]) - width)  # top-label confidence is at least 1 / C
    ax.set_xlim(low, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence (largest probability), {bins} bins")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def reliability_diagram(
    kind: str,
    point_logits: Sequence[torch.Tensor],
    labels,
    path: str | Path,
    title: str = "",
    centroid_logits: torch.Tensor | None = None,
    name: str = "model",
) -> Path:
    """:func:`plot_reliability` of a mode's probabilities (:func:`mode_probabilities`; ``sampled``/``models``:
    the S models' predictions pooled), with the centroid's curve over it when its logits are given."""
    probs = mode_probabilities(kind, point_logits)
    y = _array(labels).reshape(-1)
    pooled = np.tile(y, len(point_logits)) if kind in ("sampled", "models") else y
    reference = None if centroid_logits is None else torch.as_tensor(centroid_logits).float().softmax(-1)
    return plot_reliability(probs, pooled, path, title, reference, name=name)
