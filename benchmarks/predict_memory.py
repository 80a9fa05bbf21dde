"""What streaming ``predict``'s input buys: ``python -m benchmarks.predict_memory [--rows N] [--chunk C]``.

Writes an N-row CSV (default 1,000,000 synthetic reviews of 8-16 words, columns ``text`` and ``label``) and
reads it as ``predict --data FILE --chunk C`` does, two ways, each in a fresh process (its own resident set):

- ``stream``: what predict does now (:class:`dist_subspace.predict.Inputs`): the columns from the header, the
  check before the model loads (every row read once, a chunk at a time), then the labelling pass's reads (every
  chunk as examples, dropped when the next is read);
- ``whole``: the old way: ``read_table`` reads the file whole into a DataFrame, then the text and pair lists
  and the list of every example are built (predict's former ``read_inputs``, restated here).

**The input path only**: the model pass is not run, since a pass over a million rows takes hours on 2 CPU cores;
what it adds (the model, one chunk's tokens and activations) is the same for both ways. Prints one JSON object: the
file's size, per way the peak resident set above the one before the read (after imports and a warm-up read of a
small file; ``VmHWM`` reset, Linux), the seconds, and the rows read; ``--table`` prints a table instead.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_subspace.core.paths import CHECKOUT as ROOT

WORDS = ("the", "film", "story", "cast", "plot", "was", "really", "quite", "and", "a", "movie", "ending")
WORDS += ("great", "dull", "charming", "tedious", "moving", "bland", "wonderful", "awful")


def write_reviews(path: Path, rows: int, seed: int = 0) -> Path:
    """A CSV of ``rows`` synthetic reviews (``text``: 8-16 words, ``label``: positive/negative)."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            words = rng.choices(WORDS, k=rng.randint(8, 16))
            writer.writerow([" ".join(words), rng.choice(("positive", "negative"))])
    return path


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def _stream(path: Path, chunk: int) -> int:
    from dist_subspace.predict import Inputs

    inputs = Inputs(path, "text", None, "label", chunk)
    rows = inputs.count()  # the check before the model loads
    assert sum(len(part) for part in inputs) == rows  # the labelling pass's reads
    return rows


def _whole(path: Path, chunk: int) -> int:
    """predict's former read_inputs: the whole frame, its columns as lists, every example in one list."""
    from dist_subspace.data.tables import read_table

    frame = read_table(path)
    texts = ["" if v is None or v != v else str(v) for v in frame["text"].tolist()]
    pairs = [None] * len(texts)
    examples = []
    for i, (t, p) in enumerate(zip(texts, pairs, strict=True)):
        if not t.strip():
            raise ValueError(f"row {i} has an empty text")
        examples.append({"text": t, "text_pair": p, "label": 0, "id": i})
    return len(examples)


WAYS = {"stream": _stream, "whole": _whole}


def measure_way(way: str, path: Path, chunk: int) -> dict:
    """Read ``path`` the ``way`` way in this process: the peak resident set above the one after imports and a
    warm-up read of a small file the same way (the readers' own lazy imports and first allocations)."""
    import ctypes

    with tempfile.TemporaryDirectory() as folder:
        WAYS[way](write_reviews(Path(folder) / "warm-up.csv", 2 * chunk + 1), chunk)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current resident set
    start = time.perf_counter()
    rows = WAYS[way](path, chunk)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"rows": rows, "seconds": round(seconds, 2), "peak_bytes": peak - before, "baseline_bytes": before}


def measure(rows: int, chunk: int, folder: Path) -> dict:
    """Write the file in ``folder`` and measure both ways, each in a fresh process."""
    path = write_reviews(folder / "reviews.csv", rows)
    result = {
        "command": "python -m benchmarks.predict_memory " + " ".join(sys.argv[1:]),
        "scope": "input path only (header check, the full check pass and the labelling pass's reads); no model pass",
        "rows": rows,
        "chunk": chunk,
        "file_bytes": path.stat().st_size,
        "ways": {},
    }
    for way in WAYS:
        command = [sys.executable, "-m", "benchmarks.predict_memory", "--way", way, "--file", str(path)]
        done = subprocess.run(
            [*command, "--chunk", str(chunk)], cwd=ROOT, capture_output=True, text=True, check=True, timeout=3600
        )
        result["ways"][way] = json.loads(done.stdout)
    stream, whole = result["ways"]["stream"]["peak_bytes"], result["ways"]["whole"]["peak_bytes"]
    result["stream_over_file"] = round(stream / result["file_bytes"], 4)
    result["whole_over_file"] = round(whole / result["file_bytes"], 4)
    result["stream_over_whole"] = round(stream / whole, 4)
    return result


def format_table(result: dict) -> str:
    mib = 2**20
    size = f"{result['rows']:,} rows, {result['file_bytes'] / mib:.1f} MiB CSV, chunk {result['chunk']}"
    lines = [
        f"{size} ({result['scope']})",
        f"{'way':<8}{'peak RSS MiB':>14}{'x file':>9}{'seconds':>10}",
    ]
    for way, row in result["ways"].items():
        size = row["peak_bytes"] / result["file_bytes"]
        lines.append(f"{way:<8}{row['peak_bytes'] / mib:>14.1f}{size:>9.3f}{row['seconds']:>10.1f}")
    lines.append(f"stream / whole: {result['stream_over_whole']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=256, help="predict's --chunk (its default: 256)")
    parser.add_argument("--table", action="store_true", help="print a table instead of JSON")
    parser.add_argument("--way", choices=sorted(WAYS), help=argparse.SUPPRESS)  # the fresh process of one way
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.way is not None:
        print(json.dumps(measure_way(args.way, args.file, args.chunk)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        result = measure(args.rows, args.chunk, Path(folder))
    print(format_table(result) if args.table else json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
