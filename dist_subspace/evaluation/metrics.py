"""Task outputs -> predictions, training loss, and scores.

``logits`` are ``[B, C]``: C = the number of labels for classification; for regression either one column (an
encoder's head: the value itself) or two (a decoder's verbalizer, low and high word: the value is
``lo + (hi - lo) * p(high)``, as LM-BFF does for STS-B).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dist_subspace.data.tasks import TaskSpec


def _check(task: TaskSpec, logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    allowed = (1, 2) if task.regression else (len(task.label_names),)
    if logits.shape[1] not in allowed:
        raise ValueError(f"task {task.name}: logits have {logits.shape[1]} columns, expected one of {allowed}")


def predict(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` logits -> ``[B]`` predictions: class indices (long), or values (float) for regression."""
    _check(task, logits)
    if not task.regression:
        return logits.argmax(dim=-1)
    if logits.shape[1] == 1:
        return logits[:, 0].float()
    lo, hi = task.label_range
    return lo + (hi - lo) * logits.float().softmax(dim=-1)[:, 1]


def task_loss(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Training loss, mean over the batch (0-d) or per example (``reduction="none"``: ``[B]``): cross-entropy;
    regression: MSE (1 column) or, for the 2-word verbalizer, KL(target || softmax) with the target distribution
    ``[1 - t, t]``, ``t = (y - lo) / (hi - lo)`` (LM-BFF)."""
    _check(task, logits)
    logits = logits.float()
    if not task.regression:
        per_example = F.cross_entropy(logits, labels.long(), reduction="none")
    elif logits.shape[1] == 1:
        per_example = (logits[:, 0] - labels.float()).square()
    else:
        lo, hi = task.label_range
        t = ((labels.float() - lo) / (hi - lo)).clamp(0, 1)  # [B]
        target = torch.stack([1 - t, t], dim=-1)  # [B, 2]
        per_example = F.kl_div(logits.log_softmax(dim=-1), target, reduction="none").sum(-1)
    return per_example if reduction == "none" else per_example.mean()


def _numpy(values: torch.Tensor | Sequence | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values)


def _correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
    # Undefined for a constant input (scipy warns and returns nan): score it 0, no linear/rank agreement.
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(fn(a, b)[0])


def compute_metrics(
    task: TaskSpec, predictions: torch.Tensor | Sequence | np.ndarray, labels: torch.Tensor | Sequence | np.ndarray
) -> dict[str, float]:
    """Scores of ``[N]`` predictions against ``[N]`` labels; always holds ``task.metric`` (the primary one).

    Classification: accuracy, + binary f1 (f1 tasks: mrpc, qqp), matthews (cola), macro_f1 (more than 2
    classes). Regression: pearson, spearman, mse.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    y_pred, y_true = _numpy(predictions).reshape(-1), _numpy(labels).reshape(-1)
    if len(y_pred) != len(y_true) or len(y_true) == 0:
        raise ValueError(f"need as many predictions as labels, at least one (got {len(y_pred)} and {len(y_true)})")
    if task.regression:
        y_pred, y_true = y_pred.astype(np.float64), y_true.astype(np.float64)
        scores = {
            "pearson": _correlation(pearsonr, y_pred, y_true),
            "spearman": _correlation(spearmanr, y_pred, y_true),
            "mse": float(np.mean((y_pred - y_true) ** 2)),
        }
    else:
        classes = list(range(len(task.label_names)))
        scores = {"accuracy": accuracy_score(y_true, y_pred)}
        if task.metric == "f1":
            scores["f1"] = f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0)
        if task.metric == "matthews":
            scores["matthews"] = matthews_corrcoef(y_true, y_pred)
        if len(classes) > 2 or task.metric == "macro_f1":
            scores["macro_f1"] = f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
    if task.metric not in scores:
        raise ValueError(f"task {task.name}: metric {task.metric!r} does not apply to this kind of task")
    return {name: float(value) for name, value in scores.items()}
