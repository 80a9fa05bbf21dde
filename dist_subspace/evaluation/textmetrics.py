"""Generation metrics: predicted texts against one reference each, on a 0..1 scale (beside accuracy in the tables).

* ``bleu``: sacrebleu's corpus BLEU / 100 (tokenizer ``13a``, exponential smoothing, no effective order: a corpus
  whose sentences have no matching 4-gram scores 0);
* ``chrf``: sacrebleu's corpus chrF / 100 (character 6-grams, beta 2);
* ``rougeL``: rouge-score's ROUGE-L F-measure with the Porter stemmer, averaged over examples (its tokenizer
  lowercases and keeps ``[a-z0-9]`` runs only: text in other scripts scores 0);
* ``exact_match``: the share of predictions equal to their reference once surrounding whitespace is stripped.

sacrebleu and rouge-score are imported inside the functions, as the package keeps heavy imports lazy.
"""

from __future__ import annotations

from collections.abc import Sequence


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: one reference each")
    if not predictions:
        raise ValueError("no examples to score")


def _exact(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def _rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    from rouge_score import rouge_scorer, tokenizers

    # The tokenizer passed in, as rouge-score would build it: left to itself it logs "Using default tokenizer."
    # through absl, whose first log calls logging.basicConfig() and leaves a stderr handler on the root logger.
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
    pairs = zip(predictions, references, strict=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs]  # score(target, prediction)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus-level ``bleu``, ``chrf``, ``rougeL`` and ``exact_match`` (0..1) of ``predictions`` against
    ``references`` (one per prediction); an empty prediction scores 0. ValueError on mismatched lengths or none."""
    _check(predictions, references)
    from sacrebleu.metrics import BLEU, CHRF

    predictions, refs = list(predictions), [list(references)]
    rouge = _rouge_l(predictions, refs[0])
    return {
        "bleu": float(BLEU(tokenize="13a").corpus_score(predictions, refs).score) / 100,
        "chrf": float(CHRF().corpus_score(predictions, refs).score) / 100,
        "rougeL": float(sum(rouge) / len(rouge)),
        "exact_match": sum(_exact(p, r) for p, r in zip(predictions, refs[0], strict=True)) / len(predictions),
    }


def per_example(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """Each example's sentence-level ``rougeL``, ``chrf`` (sacrebleu's sentence chrF / 100) and ``exact_match``,
    in order (for predict's per-row output). ValueError on mismatched lengths or no examples."""
    _check(predictions, references)
    from sacrebleu import sentence_chrf

    rouge = _rouge_l(predictions, references)
    return [
        {"rougeL": float(rl), "chrf": float(sentence_chrf(p, [r]).score) / 100, "exact_match": _exact(p, r)}
        for p, r, rl in zip(predictions, references, rouge, strict=True)
    ]
