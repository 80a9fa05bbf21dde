"""Does the simplex generalise better? ``python -m dist_subspace.study STUDY.yaml [key=value ...]``.

python -m dist_subspace.study configs/study_fewshot.yaml --dry-run    # the cells and an estimated time
python -m dist_subspace.study configs/study_fewshot.yaml              # run (hours on CPU), then report
python -m dist_subspace.study configs/study_fewshot.yaml --stop-after 0 --compare k3_last k1_last   # two methods
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dist_subspace.core.cli import exit_now, user_error
from dist_subspace.core.config import ConfigError
from dist_subspace.study.fanout import LAUNCHERS
from dist_subspace.study.pilot import pilot, pilot_markdown
from dist_subspace.study.report import compare
from dist_subspace.study.run import StudyFailed, model_kind, run_study
from dist_subspace.study.spec import load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.study", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="a study YAML file (see configs/study_fewshot.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value on the spec, e.g. seeds=2 'methods=[k1,k3]'")
    parser.add_argument("--dry-run", action="store_true", help="print the cells and an estimated time; run nothing")
    parser.add_argument("--table", action="store_true", help="print the table instead of one JSON object")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after training this many units")
    parser.add_argument("--workers", type=int, default=1, help="units trained at once (the cores split between them)")
    parser.add_argument(
        "--launcher",
        default="local",
        choices=LAUNCHERS,
        help="local: this machine; slurm: one submitit job per unit (the spec's slurm: parameters); "
        "submitit-local: the same jobs as local processes",
    )
    parser.add_argument(
        "--pilot",
        action="store_true",
        help="time a few real steps of each model and task of the grid, and print the grid's expected hours "
        "(OUT/pilot.json, OUT/pilot.md); trains no unit",
    )
    parser.add_argument(
        "--archive",
        type=Path,
        metavar="DIR",
        help="keep every finished unit's summaries, metrics and configs in DIR (small: commit it) and take back "
        "from it the units this machine's output_dir lacks",
    )
    parser.add_argument(
        "--retrain-changed",
        action="store_true",
        help="units trained under another spec (a changed base, say) move to OUT/replaced/ and train again "
        "(without it such a study is refused)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("METHOD", "VERSUS"),
        help="also print METHOD against VERSUS (any two of the spec's methods) from the finished cells",
    )
    args = parser.parse_intermixed_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides)
        if args.compare and not set(args.compare) <= set(spec.methods):
            raise ConfigError(
                f"--compare {' '.join(args.compare)}: both must be among the spec's methods {spec.methods}"
            )
        if args.pilot:
            record = pilot(spec, {m: model_kind(m) for m in spec.models}, Path(spec.output_dir))
            print(pilot_markdown(record))
            return 0
        result = run_study(
            spec, args.dry_run, args.stop_after, args.workers, args.launcher, args.retrain_changed, args.archive
        )
    except StudyFailed as err:  # the report is written with the other units; a fault, not a bad input
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, OSError, RuntimeError) as err:
        return user_error(err)
    if args.table and "markdown" in result:
        print(result["markdown"])
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "markdown"}))
    if args.compare and "output_dir" in result:
        cells = json.loads((Path(result["output_dir"]) / "study.json").read_text())["cells"]
        print(compare(spec, cells, *args.compare))
    return 0


if __name__ == "__main__":
    exit_now(main())
