"""Score a finished run: ``python -m dist_subspace.evaluate RUN_DIR [--mode M] [--split S] [--landscape] [--plot P]``.

Prints one JSON object: the task metric, mode, split and number of examples (mean and std for ``sampled:S`` and
``models:S``); for classification also the calibration of the mode's probabilities, ``nll``, ``brier`` and
``ece`` (top-label expected calibration error over 15 equal-width confidence bins; see
:mod:`dist_subspace.evaluation.calibration`), and for ``ensemble:S`` the selective accuracy on the 80 % of
examples the subspace is surest of by its disagreement, against the same cut by the centroid's confidence (the
centroid is scored as one more point of the same pass). ``--plot PATH.png`` writes a reliability diagram. A
generation run prints its teacher-forced ``loss`` per response token and ``perplexity`` (every mode but
``ensemble:S``, whose responses come from the mixture of its points) and the generation metrics (``bleu``, ``chrf``,
``rougeL``, ``exact_match``; an ensemble's mean token ``entropy``) of the split's responses, decoded with
``--max-new-tokens`` and ``--num-beams`` (the run's ``eval.*`` keys by default); no calibration, no plot. Uses the
run's resolved ``config.yaml`` and its ``final/simplex.safetensors``; ``--data key=value`` changes the data (e.g.
``--data task=path/to/file.csv``). Runs under any launcher, like training.

A bad input (a folder that is not a finished run, a mode the run does not have, e.g. ``vertex:I`` beyond its K
vertices, a plot in a folder that does not exist) is refused in one line ``error: ...`` from the main process, exit
status 2, before the backbone loads; an unexpected error keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dist_subspace.core import simplex
from dist_subspace.core.cli import USER_ERRORS, OneLineParser, exit_now, user_error
from dist_subspace.core.config import ConfigError, check_eval_mode
from dist_subspace.evaluation import calibration
from dist_subspace.evaluation.responses import decoding_options, generation_run
from dist_subspace.evaluation.scoring import evaluate_replicas, evaluate_with_outputs, write_landscape
from dist_subspace.training.preflight import is_main_rank
from dist_subspace.training.reload import check_mode_fits, finished_run_config, load_finished_run


def say_error(err: BaseException) -> int:
    """:func:`~dist_subspace.core.cli.user_error` from the main process only (every rank meets the same bad input)."""
    return user_error(err) if is_main_rank() else 2


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dist_subspace.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--mode", default=None, help="centroid | vertex:I | ensemble:S | sampled:S | models:S (default: the run's)"
    )
    parser.add_argument("--split", default="test", choices=["train", "dev", "test"])
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="data overrides, e.g. task=f.csv")
    parser.add_argument("--landscape", action="store_true", help="also write landscape.png for the split")
    parser.add_argument("--plot", type=Path, metavar="PATH.png", help="write a reliability diagram (classification)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, help="generation: tokens per response (the run's by default)")
    parser.add_argument("--num-beams", type=int, help="generation: beam search at each point (the run's by default)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.plot is not None and args.plot.suffix.lower() != ".png":
            raise ConfigError(f"--plot {str(args.plot)!r}: the reliability diagram is a PNG; end the path in .png")
        if args.plot is not None and not args.plot.parent.is_dir():
            raise ConfigError(f"--plot {str(args.plot)!r}: folder {str(args.plot.parent)!r} does not exist; create it")
        # A finished run, final/ complete and not corrupt, and a usable model folder: before anything loads.
        cfg = finished_run_config(args.run_dir, [f"data.{item}" for item in args.data])
        mode = args.mode or cfg.eval.mode
        kind, number = check_eval_mode(mode)
        check_mode_fits(cfg, kind, number)  # vertex:I of the run's K, before the backbone loads
        generation, decoding = generation_run(cfg), None
        if generation and args.plot is not None:
            raise ConfigError(f"--plot: {cfg.data.task} generates text; a reliability diagram needs classes")
        if generation:
            defaults = (cfg.eval.max_new_tokens, cfg.eval.num_beams)
            decoding = decoding_options(kind, args.max_new_tokens, args.num_beams, defaults, seed=cfg.train.seed)
        elif (args.max_new_tokens, args.num_beams) != (None, None):
            raise ConfigError("--max-new-tokens and --num-beams are for a generation run; this run classifies")
    except ConfigError as err:
        return say_error(err)

    try:
        run = load_finished_run(args.run_dir, cfg)  # its own files (model, tokenizer, data): their refusals
    except USER_ERRORS as err:
        return say_error(err)
    try:  # only the refusals meant (ConfigError); a bug keeps its traceback
        task, model, engine = run.task, run.model, run.engine
        main_process = engine.is_main
        examples = {"train": run.splits.train, "dev": run.splits.dev, "test": run.splits.test}[args.split]
        if args.plot is not None and task.regression:
            raise ConfigError(f"--plot: {task.name} is a regression task; a reliability diagram needs classes")
        classes = not task.regression and not task.generation
        extra = [simplex.centroid_alpha(model.num_vertices)] if classes and kind == "ensemble" else []
        how = (task, mode, args.batch_size, cfg.simplex.sampling)
        if task.generation:  # the split's responses decoded and scored, beside the loss
            scores = evaluate_replicas(model, engine, [examples], run.collator, *how, decoding=decoding)[0]
        else:
            scores, outputs, extra_outputs = evaluate_with_outputs(model, engine, examples, run.collator, *how, extra)
        result = {"metric": task.metric, "value": scores[task.metric], "split": args.split, **scores}
        if classes:
            labels = torch.tensor([e["label"] for e in examples])
            centroid = extra_outputs[0] if extra_outputs else None
            result.update(calibration.mode_calibration(kind, outputs, labels, centroid))
            if args.plot is not None and main_process:
                title = f"{task.name} {args.split}: reliability of {mode}, n={len(examples)}"
                path = calibration.reliability_diagram(kind, outputs, labels, args.plot, title, centroid, mode)
                result["plot"] = str(path)
        if args.landscape:
            grid = cfg.eval.landscape_resolution
            path = write_landscape(model, engine, examples, run.collator, task, args.run_dir, grid, args.batch_size)
            result["landscape"] = str(path) if path else None
    except ConfigError as err:
        return say_error(err)
    finally:
        run.end()  # a later run in this process (a notebook, a test) starts clean
    if main_process:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    exit_now(main())
