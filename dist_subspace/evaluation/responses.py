"""Responses to new prompts at a mode's points, with how much an ensemble's points disagree: what ``predict`` and
``generate`` share.

One point (the centroid, a vertex, any ``alpha``) decodes each prompt's response on its own. An ensemble of S points
decodes from the mixture of its points (:mod:`dist_subspace.evaluation.decoding`) and, in the same stacked call, each
point alone, as S more groups of one row beside the mixture's group: every prompt's ``entropy`` (the mixture's mean
entropy per generated token) and ``disagreement`` (the share of the S points whose own response differs from the
mixture's) come from the same stacked forwards (S more rows, under ZeRO-3 the same gathers of the backbone), and
every process still runs the same number of forwards."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dist_subspace.core.config import ConfigError
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.data.batching import Collator
from dist_subspace.data.tasks import TASKS, Example, TaskSpec
from dist_subspace.evaluation.decoding import Decoded, DecodeQuery, Decoding, decode_texts
from dist_subspace.evaluation.points import Point

# Prompts given as they are (``generate``'s), each its own text: no template around it.
PLAIN_PROMPTS = TaskSpec("prompts", (), (), "{text}", "rougeL", generation=True)


def generation_run(cfg) -> bool:
    """Whether the run of config ``cfg`` generates text, known before anything loads: a named generation task
    (``bbc_headlines``), or a local file read as responses (``data.response_field``) or chat records
    (``data.messages_field``)."""
    task = TASKS.get(cfg.data.task)
    return task.generation if task is not None else bool(cfg.data.response_field or cfg.data.messages_field)


@dataclass
class Responses:
    """The responses of one mode (an ensemble's: its mixture's), and per prompt the share of the ensemble's points
    whose own response differs (None for one point)."""

    decoded: Decoded
    disagreement: list[float] | None = None

    def rows(self) -> list[dict]:
        """One dict per prompt: ``response``; for an ensemble also ``entropy`` and ``disagreement``."""
        rows = [{"response": text} for text in self.decoded.texts]
        if self.disagreement is not None:
            for row, entropy, share in zip(rows, self.decoded.entropy, self.disagreement, strict=True):
                row.update(entropy=entropy, disagreement=share)
        return rows


def prompt_examples(examples: Sequence[Example]) -> list[Example]:
    """``examples`` as prompts to answer: each one's response (``label``) empty, so the collator cuts nothing from
    the prompt for it beyond the end-of-sequence token's place."""
    return [{**e, "label": ""} for e in examples]


def decode_responses(
    model: PrefixSubspaceModel,
    engine,
    examples: Sequence[Example],
    collator: Collator,
    points: Sequence[Point],
    ensemble: bool,
    decoding: Decoding,
    batch_size: int = 32,
) -> Responses:
    """Each example's response at ``points``: one point's own, or (``ensemble``) the mixture's of all of them with
    every point's own decoded beside it in the same call, for the disagreement. ``examples`` are prompts (see
    :func:`prompt_examples`); a point per example (a function of example indices) sees each example's position in
    ``examples`` (shift it with :func:`~dist_subspace.evaluation.points.from_offset` for a slice of a longer list)."""
    prompts = prompt_examples(examples)
    if not ensemble:
        if len(points) != 1:
            raise ValueError(f"one point decodes alone; got {len(points)} (pass ensemble=True to mix them)")
        (decoded,) = decode_texts(model, engine, [DecodeQuery(prompts, points)], collator, decoding, batch_size)
        return Responses(decoded)
    queries = [DecodeQuery(prompts, points), *(DecodeQuery(prompts, [point]) for point in points)]
    mixture, *alone = decode_texts(model, engine, queries, collator, decoding, batch_size)
    disagreement = [sum(d.texts[n] != text for d in alone) / len(alone) for n, text in enumerate(mixture.texts)]
    return Responses(mixture, disagreement)


def decoding_options(
    kind: str,
    max_new_tokens: int | None,
    num_beams: int | None,
    defaults: tuple[int, int] = (32, 1),
    temperature: float = 0.0,
    seed: int = 0,
) -> Decoding:
    """A command's ``--max-new-tokens`` and ``--num-beams`` for mode ``kind`` (None: ``defaults``, e.g. the run's
    ``eval.max_new_tokens`` and ``eval.num_beams``; an ensemble's beams default to 1) as a :class:`Decoding`. A
    ConfigError (one line) for a count under 1, beam search with sampling, and beam search of an ensemble, whose S
    points decode from their mixture one token at a time (greedy or sampled): checked before anything loads."""
    tokens = defaults[0] if max_new_tokens is None else max_new_tokens
    beams = (1 if kind == "ensemble" else defaults[1]) if num_beams is None else num_beams
    if tokens < 1 or beams < 1:
        raise ConfigError(f"--max-new-tokens and --num-beams must be >= 1 (got {tokens}, {beams})")
    if beams > 1 and kind == "ensemble":
        raise ConfigError(
            f"--num-beams {beams}: an ensemble decodes from the mixture of its points one token at a time, with no "
            "beam search; use --num-beams 1, or beams at one point (centroid, vertex:I)"
        )
    if beams > 1 and temperature > 0:
        raise ConfigError(f"--num-beams {beams} searches, it does not sample: use --temperature 0 or --num-beams 1")
    return Decoding(tokens, temperature, beams, seed)
