"""``dist-subspace <command> [args]`` (or ``python -m dist_subspace <command>``): one entry point for the commands,
each also a module of its own (``python -m dist_subspace.train`` ...). A command's module is imported only when it
runs, so ``dist-subspace plan`` loads neither DeepSpeed nor ``datasets``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("dist_subspace.train", "train a prefix subspace (the embedded default without --config)"),
    "evaluate": ("dist_subspace.evaluate", "score a finished run in a mode (centroid, ensemble:S, sampled:S, ...)"),
    "predict": ("dist_subspace.predict", "label new texts (csv/tsv/jsonl/parquet) with a finished run"),
    "generate": ("dist_subspace.generate", "generate text at a point of a decoder's simplex"),
    "plan": ("dist_subspace.plan", "plan the memory of a run per GPU, before renting the GPUs"),
    "study": ("dist_subspace.study.__main__", "run a grid of methods x tasks x seeds and its statistics"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {about}" for name, (_, about) in COMMANDS.items()]
    return "usage: dist-subspace <command> [args]   (dist-subspace <command> --help for its own)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``argv[0]``'s ``main`` with the rest of ``argv``; its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(rest)


def entry() -> None:
    """The console script: run the command, then leave as the commands do (flushed, at once)."""
    from dist_subspace.core.cli import exit_now

    exit_now(main())


if __name__ == "__main__":
    entry()
