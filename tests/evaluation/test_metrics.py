"""Predictions, losses and scores: scores equal scikit-learn/scipy on fixed predictions."""

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from dist_subspace.data.tasks import TASKS
from dist_subspace.evaluation.metrics import compute_metrics, predict, task_loss

Y_TRUE = [0, 1, 1, 0, 1, 1, 0, 0, 1, 1]
Y_PRED = [0, 1, 0, 0, 1, 1, 1, 0, 1, 0]


def test_binary_metrics_match_sklearn():
    assert compute_metrics(TASKS["sst2"], torch.tensor(Y_PRED), torch.tensor(Y_TRUE)) == {
        "accuracy": pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    }
    mrpc = compute_metrics(TASKS["mrpc"], Y_PRED, Y_TRUE)
    assert mrpc["f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED)) and "accuracy" in mrpc
    cola = compute_metrics(TASKS["cola"], Y_PRED, Y_TRUE)
    assert cola["matthews"] == pytest.approx(matthews_corrcoef(Y_TRUE, Y_PRED))
    assert all(type(v) is float for v in {**mrpc, **cola}.values())


def test_multiclass_metrics_match_sklearn():
    y_true, y_pred = [0, 1, 2, 2, 1, 0, 2, 7], [0, 2, 2, 2, 1, 1, 0, 7]
    scores = compute_metrics(TASKS["reuters_r8"], torch.tensor(y_pred), torch.tensor(y_true))
    assert scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    expected = f1_score(y_true, y_pred, labels=range(8), average="macro", zero_division=0)
    assert scores["macro_f1"] == pytest.approx(expected)


def test_regression_metrics_match_scipy():
    y_true = torch.tensor([0.0, 1.2, 2.5, 3.1, 4.8, 5.0])
    y_pred = torch.tensor([0.4, 1.0, 2.9, 2.7, 4.1, 4.9])
    scores = compute_metrics(TASKS["stsb"], y_pred, y_true)
    assert scores["pearson"] == pytest.approx(pearsonr(y_pred.numpy(), y_true.numpy())[0], rel=1e-5)
    assert scores["spearman"] == pytest.approx(spearmanr(y_pred.numpy(), y_true.numpy())[0], rel=1e-5)
    assert compute_metrics(TASKS["stsb"], torch.full((6,), 2.0), y_true)["pearson"] == 0.0  # constant: 0, not nan


def test_metrics_errors():
    with pytest.raises(ValueError, match="as many predictions as labels"):
        compute_metrics(TASKS["sst2"], [0, 1], [0])


def test_predict_classification_and_regression():
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0]])
    assert predict(TASKS["sst2"], logits).tolist() == [1, 0]
    stsb = TASKS["stsb"]
    torch.testing.assert_close(predict(stsb, torch.tensor([[1.5], [4.0]])), torch.tensor([1.5, 4.0]))
    two = torch.tensor([[0.0, 0.0], [-30.0, 30.0], [30.0, -30.0]])  # p(yes) = 0.5, ~1, ~0
    torch.testing.assert_close(predict(stsb, two), torch.tensor([2.5, 5.0, 0.0]))
    with pytest.raises(ValueError, match="3 columns"):
        predict(TASKS["sst2"], torch.zeros(2, 3))


def test_task_loss():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(task_loss(TASKS["mnli"], logits, labels), F.cross_entropy(logits, labels))
    stsb, y = TASKS["stsb"], torch.tensor([0.0, 2.5, 5.0])
    torch.testing.assert_close(task_loss(stsb, torch.tensor([[1.0], [2.0], [5.0]]), y), torch.tensor(1.25 / 3))
    # Two columns: KL to [1 - t, t]; zero when softmax matches the target, positive otherwise.
    t = y / 5
    exact = torch.stack([torch.log1p(-t.clamp(max=1 - 1e-7)), torch.log(t.clamp(min=1e-7))], dim=-1)
    assert task_loss(stsb, exact, y).item() == pytest.approx(0.0, abs=1e-5)
    wrong = exact.flip(-1)
    assert task_loss(stsb, wrong, y).item() > 1.0
    logits = torch.zeros(3, 2, requires_grad=True)
    loss = task_loss(stsb, logits, y)
    loss.backward()
    assert loss.dim() == 0 and logits.grad.abs().sum() > 0
