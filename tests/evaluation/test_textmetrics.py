"""Generation metrics: 1.0 on identical texts, a hand-checked exact match and ROUGE-L, BLEU/chrF equal to sacrebleu's
own numbers (so the 0..1 scale and the 13a tokenizer are what the module says), empty predictions score 0."""

import pytest
import sacrebleu

from dist_subspace.evaluation.textmetrics import per_example, text_metrics

PREDS = ["The cat sat on the mat.", "It is raining, so take an umbrella!", "Paris is the capital of France."]
REFS = ["The cat is sitting on the mat.", "It's raining, so take your umbrella!", "Paris is the capital of France."]


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_identical_texts_score_one():
    scores = text_metrics(REFS, REFS)
    assert set(scores) == {"bleu", "chrf", "rougeL", "exact_match"}
    assert all(type(v) is float for v in scores.values())
    assert scores == pytest.approx(dict.fromkeys(scores, 1.0))
    for row in per_example(REFS, REFS):
        assert row == pytest.approx({"rougeL": 1.0, "chrf": 1.0, "exact_match": 1.0})


def test_exact_match_by_hand():
    # surrounding whitespace is stripped; case and inner text are not normalised
    scores = text_metrics(["yes", " no\n", "Maybe"], ["yes", "no", "maybe"])
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert [row["exact_match"] for row in per_example(["yes", " no\n", "Maybe"], ["yes", "no", "maybe"])] == [1, 1, 0]


def test_rouge_l_by_hand():
    # lowercase, no punctuation, words of 3 letters or fewer (which the Porter stemmer leaves alone in rouge-score):
    # the tokens are the words, and LCS = "cat on the mat" = 4
    pred, ref = "the cat sat on the mat", "a cat was on the red mat too"
    lcs = _lcs(pred.split(), ref.split())
    assert lcs == 4
    precision, recall = lcs / len(pred.split()), lcs / len(ref.split())  # 4/6, 4/8
    f_measure = 2 * precision * recall / (precision + recall)
    assert f_measure == pytest.approx(4 / 7)
    assert per_example([pred], [ref])[0]["rougeL"] == pytest.approx(f_measure)
    # the corpus rougeL is the mean over examples
    assert text_metrics([pred, ref], [ref, ref])["rougeL"] == pytest.approx((f_measure + 1) / 2)
    # the stemmer is on: "cats sitting" -> "cat sit"
    assert per_example(["The cats sitting"], ["the cat sits"])[0]["rougeL"] == pytest.approx(1.0)


def test_bleu_and_chrf_equal_sacrebleu():
    scores = text_metrics(PREDS, REFS)
    metric = sacrebleu.BLEU()  # what corpus_bleu uses, with its default tokenizer
    bleu = metric.corpus_score(PREDS, [REFS])
    assert "tok:13a" in str(metric.get_signature()) and bleu.score == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    assert 0 < scores["bleu"] < 1 and scores["bleu"] == pytest.approx(bleu.score / 100)
    # the tokenizer matters on this corpus (punctuation glued to words): 13a, not whitespace
    assert scores["bleu"] != pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS], tokenize="none").score / 100)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score / 100)
    sentence = [sacrebleu.sentence_chrf(p, [r]).score / 100 for p, r in zip(PREDS, REFS, strict=True)]
    assert [row["chrf"] for row in per_example(PREDS, REFS)] == pytest.approx(sentence)


def test_empty_prediction_scores_zero():
    assert text_metrics([""], ["the cat sat on the mat"]) == pytest.approx(
        {"bleu": 0.0, "chrf": 0.0, "rougeL": 0.0, "exact_match": 0.0}
    )
    row = per_example(["", REFS[2]], ["the cat sat on the mat", REFS[2]])[0]
    assert row == pytest.approx({"rougeL": 0.0, "chrf": 0.0, "exact_match": 0.0})


@pytest.mark.parametrize("fn", [text_metrics, per_example])
def test_mismatched_or_no_examples_refused(fn):
    with pytest.raises(ValueError, match="one reference each"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        fn([], [])


def test_scoring_leaves_the_root_logger_as_it_found_it():
    # rouge-score's default tokenizer logs through absl, which calls logging.basicConfig(): a stderr handler on the
    # root logger that outlives the call (under pytest, a closed capture file that a later test's logs hit).
    import logging

    before = list(logging.root.handlers)
    logging.root.handlers.clear()
    try:
        per_example(PREDS, REFS)
        text_metrics(PREDS, REFS)
        assert logging.root.handlers == []
    finally:
        logging.root.handlers[:] = before
