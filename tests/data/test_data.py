"""Tasks and few-shot protocols: counts, determinism, disjointness, clear errors; no network (local files only)."""

import csv
import json
from collections import Counter

import pytest
import torch

from dist_subspace.data.batching import Collator
from dist_subspace.data.sources import kshot_indices, load_splits
from dist_subspace.data.tasks import GLUE, TASKS


def _ids(split):
    return [e["id"] for e in split]


def _disjoint(splits):
    """Splits drawn from the same source split share no id."""
    by_source = {}
    for name in ("train", "dev", "test"):
        by_source.setdefault(splits.sources[name], []).extend(_ids(getattr(splits, name)))
    for ids in by_source.values():
        assert len(ids) == len(set(ids))


def _write_tsv(path, header, rows):
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in [header, *rows]))
    return str(path)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def sst2_files(tmp_path):
    """GLUE sst2 in the hub's column names: 30 train rows (15 per class), 12 validation rows."""
    train = [(f'train sentence {i} with "quotes"', i % 2, i) for i in range(30)]
    val = [(f"validation sentence {i}", i % 2, i) for i in range(12)]
    header = ("sentence", "label", "idx")
    return {
        "train": _write_tsv(tmp_path / "train.tsv", header, train),
        "validation": _write_tsv(tmp_path / "dev.tsv", header, val),
    }


# ---- protocols -----------------------------------------------------------------------------------
def test_kshot_counts_determinism_disjoint(sst2_files):
    a = load_splits("sst2", shots_per_class=4, seed=0, test_size=0, data_files=sst2_files)
    assert Counter(e["label"] for e in a.train) == {0: 4, 1: 4}
    assert Counter(e["label"] for e in a.dev) == {0: 4, 1: 4}
    assert len(a.test) == 12 and a.sources == {"train": "train", "dev": "train", "test": "validation"}
    assert not set(_ids(a.train)) & set(_ids(a.dev))
    same = load_splits("sst2", shots_per_class=4, seed=0, test_size=0, data_files=sst2_files)
    other = load_splits("sst2", shots_per_class=4, seed=1, test_size=0, data_files=sst2_files)
    assert _ids(same.train) == _ids(a.train) and _ids(same.dev) == _ids(a.dev)
    assert _ids(other.train) != _ids(a.train)
    assert a.manifest()["train"] == {"source": "train", "ids": _ids(a.train)}


def test_kshot_short_class_error(sst2_files):
    with pytest.raises(ValueError, match=r"fewer than k=8.*shots_per_class"):
        load_splits("sst2", shots_per_class=8, data_files=sst2_files)  # 15 per class: 8 train leave 7 for dev


def test_kshot_indices_direct():
    gen = torch.Generator().manual_seed(0)
    chosen = kshot_indices([0, 1, 0, 1, 0, 1, 2, 2], 2, gen)
    assert Counter([0, 1, 0, 1, 0, 1, 2, 2][i] for i in chosen) == {0: 2, 1: 2, 2: 2}
    with pytest.raises(ValueError, match="class 'c' has 0 examples"):
        kshot_indices([0, 1, 0, 1], 1, gen, names=("a", "b", "c"))


def test_first_n_counts_disjoint(sst2_files):
    s = load_splits("sst2", protocol="first_n", first_n=10, dev_size=6, test_size=5, seed=3, data_files=sst2_files)
    assert (len(s.train), len(s.dev), len(s.test)) == (10, 6, 5)
    _disjoint(s)
    assert _ids(load_splits("sst2", "first_n", first_n=10, dev_size=6, seed=3, data_files=sst2_files).train) == _ids(
        s.train
    )
    with pytest.raises(ValueError, match="exceeds the 30 training examples"):
        load_splits("sst2", protocol="first_n", first_n=25, dev_size=6, data_files=sst2_files)


def test_one_split_source_holds_out_test(tmp_path):
    rows = [{"review": f"text {i}", "stars": ["bad", "good", "ok"][i % 3]} for i in range(60)]
    path = _write_jsonl(tmp_path / "reviews.jsonl", rows)
    kw = dict(text_field="review", label_field="stars", shots_per_class=3, test_size=10)
    a, b = load_splits(path, seed=0, **kw), load_splits(path, seed=1, **kw)
    assert (len(a.train), len(a.dev), len(a.test)) == (9, 9, 10)
    assert _ids(a.test) == _ids(b.test)  # a capped test split does not depend on the seed
    _disjoint(a)
    rest = load_splits(path, seed=0, **{**kw, "test_size": 0})
    assert len(rest.test) == 60 - 18
    _disjoint(rest)


# ---- GLUE in the hub's format, from local files --------------------------------------------------
def test_glue_sst2_local(sst2_files):
    s = load_splits("glue:sst2", shots_per_class=2, test_size=5, data_files=sst2_files)
    assert s.task is TASKS["sst2"] or s.task == TASKS["sst2"]
    assert s.task.label_words == (" terrible", " great") and not s.task.has_pair
    assert len(s.test) == 5 and all(e["text_pair"] is None for e in s.train)
    assert '"quotes"' in s.train[0]["text"]  # TSV: quotes are text


def test_glue_pair_task_local(tmp_path):
    header = ("sentence1", "sentence2", "label", "idx")
    rows = [(f"a{i}", f"b{i}", ["entailment", "not_entailment"][i % 2], i) for i in range(20)]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    val = [dict(zip(header, (f"c{i}", f"d{i}", i % 2, i), strict=True)) for i in range(6)]
    files = {"train": str(tmp_path / "train.csv"), "validation": _write_jsonl(tmp_path / "val.jsonl", val)}
    s = load_splits("rte", shots_per_class=3, data_files=files)
    assert s.task.has_pair and s.task.label_names == ("entailment", "not_entailment")
    assert all(e["text_pair"] == "b" + e["text"][1:] for e in s.train)  # string labels map to their index
    assert Counter(e["label"] for e in s.train) == {0: 3, 1: 3}
    assert len(s.test) == 6


def test_glue_stsb_regression_local(tmp_path):
    rows = [{"sentence1": f"x{i}", "sentence2": f"y{i}", "label": i / 8, "idx": i} for i in range(41)]
    val = [
        {"sentence1": "p", "sentence2": "q", "label": 2.5, "idx": 0},
        {"sentence1": "r", "sentence2": "s", "label": -1},
    ]
    files = {
        "train": _write_jsonl(tmp_path / "train.jsonl", rows),
        "validation": _write_jsonl(tmp_path / "v.jsonl", val),
    }
    s = load_splits("stsb", shots_per_class=4, data_files=files)
    assert s.task.regression and s.task.label_range == (0, 5) and s.task.head_outputs == 1
    labels = [e["label"] for e in s.train]
    assert sum(y >= 2.5 for y in labels) == 4 and sum(y < 2.5 for y in labels) == 4  # k per half, median 2.5
    assert [e["label"] for e in s.test] == [2.5]  # GLUE's unlabelled -1 rows are dropped
    batch = Collator(_FakeTokenizer(), s.task, decoder=False)(list(enumerate(s.train)))
    assert batch["labels"].dtype == torch.float32


def test_glue_hub_path_uses_registered_columns(monkeypatch):
    """The hub loader (no network here: load_dataset is replaced) reads mnli's validation_matched split."""
    import datasets

    def fake_load_dataset(path, name):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        row = lambda i: {"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3, "idx": i}  # noqa: E731
        return datasets.DatasetDict(
            train=datasets.Dataset.from_list([row(i) for i in range(12)]),
            validation_matched=datasets.Dataset.from_list([row(i) for i in range(5)]),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    s = load_splits("mnli", shots_per_class=2, test_size=0)
    assert s.sources["test"] == "validation_matched" and len(s.test) == 5
    assert s.train[0]["text"].startswith("p") and s.train[0]["text_pair"].startswith("h")


def test_glue_registry_is_consistent():
    assert set(GLUE) == {"sst2", "cola", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    for name, (_, pair, _) in GLUE.items():
        task = TASKS[name]
        assert task.has_pair == (pair is not None)
        assert all(w.startswith(" ") for w in task.label_words)
        task.template.format(text="a", text_pair="b")


# ---- offline tasks and local files ---------------------------------------------------------------
def test_offline_tasks_load():
    r8 = load_splits("reuters_r8", protocol="first_n", first_n=5485 - 5, dev_size=5, test_size=0)
    assert len(r8.train) + len(r8.dev) == 5485 and len(r8.test) == 2189
    assert len(r8.task.label_names) == 8 and set(Counter(e["label"] for e in r8.test)) == set(range(8))
    rt = load_splits("rotten_tomatoes", shots_per_class=4, seed=0, test_size=0)
    assert len(rt.train) == len(rt.dev) == 8 and len(rt.test) == 12_808 - 16
    _disjoint(rt)


NEW_OFFLINE = {"bbc_news": (5, 2225, None), "newsgroups20": (20, 11_293, 7528), "reuters_r52": (52, 6532, 2568)}


@pytest.mark.parametrize("name", sorted(NEW_OFFLINE))
def test_new_offline_tasks_load(name):
    """Every class present, splits disjoint, no empty text; kshot where each class has 2k training examples."""
    classes, train, test = NEW_OFFLINE[name]
    task = TASKS[name]
    assert len(task.label_names) == len(set(task.label_words)) == classes == task.head_outputs
    assert list(task.label_names) == sorted(task.label_names)
    if name == "reuters_r52":  # platinum has one training article: kshot cannot draw train and dev
        with pytest.raises(ValueError, match="class 'platinum' has 0 examples left"):
            load_splits(name, shots_per_class=1)
        s = load_splits(name, protocol="first_n", first_n=train - 5, dev_size=5, test_size=0)
        assert len(s.train) + len(s.dev) == train
        assert set(Counter(e["label"] for e in s.train)) == set(range(classes))
    else:
        s = load_splits(name, shots_per_class=4, seed=0, test_size=0)
        each = dict.fromkeys(range(classes), 4)
        assert Counter(e["label"] for e in s.train) == each and Counter(e["label"] for e in s.dev) == each
        assert _ids(s.train) != _ids(load_splits(name, shots_per_class=4, seed=1, test_size=0).train)
    assert len(s.test) == (test if test is not None else train - 8 * classes)
    assert set(Counter(e["label"] for e in s.test)) == set(range(classes))
    assert all(e["text"].strip() and e["text_pair"] is None for e in (*s.train, *s.dev, *s.test))
    _disjoint(s)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bbc_news", "newsgroups20", "reuters_r8", "reuters_r52", "rotten_tomatoes", "snli"])
def test_offline_label_words_are_one_smollm2_token(name):
    from transformers import AutoTokenizer

    from dist_subspace.core.embedded import resolve_model
    from dist_subspace.data.batching import label_token_ids

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    words = TASKS[name].label_words
    assert len(set(label_token_ids(tokenizer, words))) == len(words)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NEW_OFFLINE))
def test_new_offline_tasks_collate_for_both_backbones(name):
    """SmolLM2 reads the prompt (cut on the left, its end kept); MiniLM reads the raw text for a head of one
    output per class."""
    from transformers import AutoTokenizer

    from dist_subspace.core.embedded import resolve_model

    examples = load_splits(name, protocol="first_n", first_n=2, dev_size=0, test_size=2).train
    decoder = Collator(AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")), TASKS[name], True, 64)
    encoder = Collator(AutoTokenizer.from_pretrained(resolve_model("minilm-l6")), TASKS[name], False, 64)
    for collator in (decoder, encoder):
        ids = collator(list(enumerate(examples)))["input_ids"]
        assert ids.shape[0] == 2 and ids.shape[1] <= 64
    assert all(decoder.tokenizer.decode(decoder.encode(e)["input_ids"]).endswith("Topic:") for e in examples)


def test_local_csv_and_jsonl_custom_fields(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}", "y": ["no", "yes"][i % 2]} for i in range(20)]
    jsonl = _write_jsonl(tmp_path / "qa.jsonl", rows)
    csv_path = tmp_path / "qa.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["q", "a", "y"])
        writer.writeheader()
        writer.writerows(rows)
    for path in (jsonl, str(csv_path)):
        s = load_splits(path, shots_per_class=2, test_size=4, text_field="q", text_pair_field="a", label_field="y")
        assert s.task.label_names == ("no", "yes") and s.task.label_words == (" no", " yes")
        assert s.task.has_pair and s.train[0]["text_pair"].startswith("answer")
        assert (len(s.train), len(s.dev), len(s.test)) == (4, 4, 4)
    s = load_splits(jsonl, shots_per_class=2, test_size=4, text_field="q", label_field="y", label_words=[" No", " Yes"])
    assert s.task.label_words == (" No", " Yes")
    with pytest.raises(ValueError, match=r"no column 'text'; columns present: \['q', 'a', 'y'\]"):
        load_splits(jsonl, label_field="y")
    with pytest.raises(ValueError, match=r"test_size=20 holds out all 20"):
        load_splits(jsonl, shots_per_class=2, test_size=20, text_field="q", label_field="y")


def test_clear_errors(tmp_path, sst2_files):
    with pytest.raises(ValueError, match=r"unknown task 'nope'; registered: .*sst2"):
        load_splits("nope")
    with pytest.raises(ValueError, match="not found"):
        load_splits(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match=r"unknown data\.protocol"):
        load_splits("sst2", protocol="all", data_files=sst2_files)
    with pytest.raises(ValueError, match="3 label words for 2 labels"):
        load_splits("sst2", label_words=[" a", " b", " c"], data_files=sst2_files)
    with pytest.raises(ValueError, match=r"split names .* got keys \['dev', 'train'\]"):
        load_splits("sst2", data_files={"train": sst2_files["train"], "dev": sst2_files["validation"]})
    with pytest.raises(ValueError, match="must contain"):
        load_splits("sst2", template="no placeholder", data_files=sst2_files)


class _FakeTokenizer:
    """Enough of a tokenizer for Collator: one id per character."""

    pad_token, eos_token, pad_token_id = "<pad>", "<pad>", 0

    def __call__(self, text, pair=None, truncation=True, max_length=256):
        return {"input_ids": [ord(c) for c in text + (pair or "")][:max_length]}


def test_encoder_pairs_carry_segment_ids():
    from transformers import AutoTokenizer

    from dist_subspace.core.embedded import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    example = {"text": "a b", "text_pair": "c d e", "label": 0, "id": 0}
    batch = Collator(tokenizer, TASKS["rte"], decoder=False)([(0, example)])
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]  # [CLS] a b [SEP] | c d e [SEP]
    assert "token_type_ids" not in Collator(tokenizer, TASKS["rte"], decoder=True)([(0, example)])


@pytest.mark.parametrize(("model", "task", "decoder"), [("smollm2-135m", "sst2", True), ("minilm-l6", "rte", False)])
def test_pretokenised_batches_equal_the_tokenizers_batched_call(model, task, decoder):
    """Each example is tokenised once and the loop only pads: the same tensors as the tokenizer's own batched,
    padded, truncated call (decoders: the prompt, cut on the left; encoders: the pair, cut on the right)."""
    from transformers import AutoTokenizer

    from dist_subspace.core.embedded import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    spec = TASKS[task]
    words = ["a", "rather", "long", "and", "winding", "review", "of", "a", "film", "that", "nobody", "asked", "for"]
    examples = [
        {"text": " ".join(words[: 2 + 3 * i]), "text_pair": " ".join(words[i:]), "label": i % 2, "id": i}
        for i in range(4)
    ]
    collator = Collator(tokenizer, spec, decoder=decoder, max_length=12)
    batch = collator(list(enumerate(examples)))
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left" if decoder else "right"
    if decoder:
        texts = [spec.template.format(text=e["text"], text_pair=e["text_pair"]) for e in examples]
        expected = tokenizer(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    else:
        texts, pairs = [e["text"] for e in examples], [e["text_pair"] for e in examples]
        expected = tokenizer(texts, pairs, padding=True, truncation=True, max_length=12, return_tensors="pt")
    keys = ("input_ids", "attention_mask") + (() if decoder else ("token_type_ids",))
    for key in keys:
        assert torch.equal(batch[key], expected[key]), key
    assert len(collator._encoded) == 4
    again = collator([(7, examples[2]), (8, examples[0])])  # from the cache, padded to this batch
    assert again["index"].tolist() == [7, 8] and len(collator._encoded) == 4
    assert again["input_ids"].shape[1] == max(len(collator.encode(e)["input_ids"]) for e in examples[::2])


def test_decoders_pad_on_the_right_and_truncate_on_the_left():
    """Right padding: attention needs no mask; left truncation: the prompt's end (the answer position) stays."""
    from transformers import AutoTokenizer

    from dist_subspace.core.embedded import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    short, long = (
        {"text": "fine", "label": 0, "id": 0},
        {"text": "a rather long and winding review", "label": 1, "id": 1},
    )
    batch = Collator(tokenizer, TASKS["rotten_tomatoes"], decoder=True)([(0, short), (1, long)])
    mask = batch["attention_mask"]
    assert mask[1].all() and mask[0, 0] == 1 and mask[0, -1] == 0  # the short prompt is padded after its end
    clipped = Collator(tokenizer, TASKS["rotten_tomatoes"], decoder=True, max_length=4)([(1, long)])
    assert tokenizer.decode(clipped["input_ids"][0]).endswith("Sentiment:")
