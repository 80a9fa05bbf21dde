"""The stratified protocol (data.protocol=stratified): N training examples in all and a dev set, both stratified by
class; its rounding, disjointness, determinism by seed and refusals. Made-up pools only: fast, no network."""

import json
import math
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml

from dist_subspace.core.config import Config, ConfigError, DataConfig, load_config
from dist_subspace.data.sources import load_splits, stratified_counts, stratified_indices


def _hamilton(counts, n):
    """Largest-remainder rounding of the shares n * count / total, written out (ties: the lower class)."""
    shares = [Fraction(n * c, sum(counts)) for c in counts]
    taken = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(counts)), key=lambda c: (-(shares[c] - taken[c]), c))
    for c in by_remainder[: n - sum(taken)]:
        taken[c] += 1
    return taken


def test_counts_are_largest_remainder_where_every_share_is_at_least_one():
    assert stratified_counts([50, 30, 20], 10) == [5, 3, 2]
    assert stratified_counts([5405, 7403], 100) == [42, 58]  # shares 42.2, 57.8
    assert stratified_counts([1, 1], 1) == [1, 0]  # a tie goes to the lower class
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(1, 400) for _ in range(rng.randint(2, 8))]
        n = rng.randint(0, sum(counts))
        if all(n * c >= sum(counts) for c in counts):
            assert stratified_counts(counts, n) == _hamilton(counts, n), (counts, n)


def test_counts_give_every_class_one_where_n_allows():
    assert stratified_counts([5, 90, 5], 10) == [1, 8, 1]  # shares 0.5, 9, 0.5: the 1s come off the big class
    assert stratified_counts([5, 90, 5], 2) == [0, 2, 0]  # N below the number of classes: no minimum
    assert stratified_counts([0, 10, 3], 4) == [0, 3, 1]  # an empty class gets nothing
    assert stratified_counts([1, 2], 3) == [1, 2]  # the whole pool
    rng = random.Random(1)
    for _ in range(300):
        counts = [rng.choice([0, 1, 2, 3, 50, 500]) for _ in range(rng.randint(1, 12))]
        if not sum(counts):
            continue
        n = rng.randint(0, sum(counts))
        taken = stratified_counts(counts, n)
        present = sum(c > 0 for c in counts)
        assert sum(taken) == n and all(0 <= t <= c for t, c in zip(taken, counts, strict=True))
        if n >= present:
            assert all(t >= 1 for t, c in zip(taken, counts, strict=True) if c)
    with pytest.raises(ValueError, match="cannot draw 4 examples from 3"):
        stratified_counts([1, 2], 4)


def test_indices_are_drawn_per_class_without_the_excluded():
    labels = [0] * 30 + [1] * 10
    gen = torch.Generator().manual_seed(0)
    chosen = stratified_indices(labels, 8, gen, exclude=set(range(10)))  # pool: 20 of class 0, 10 of class 1
    assert Counter(labels[i] for i in chosen) == {0: 5, 1: 3} and not set(chosen) & set(range(10))
    assert chosen == sorted(chosen) and len(set(chosen)) == 8
    assert stratified_indices(labels, 3, gen, classes=3) != []  # a class with no examples is allowed


def _pool_file(tmp_path, sizes=(60, 30, 10)):
    """A local JSON-lines task: ``sizes[c]`` rows of class c, interleaved."""
    rows = [{"text": f"text {c} {i}", "label": f"c{c}"} for c, size in enumerate(sizes) for i in range(size)]
    random.Random(0).shuffle(rows)
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _labels(split):
    return Counter(e["label"] for e in split)


def test_stratified_counts_disjoint_and_seeded(tmp_path):
    path = _pool_file(tmp_path)
    kw = dict(protocol="stratified", train_size=10, dev_size=20, test_size=20)
    s = load_splits(path, seed=0, **kw)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]  # id = row, label cK -> K
    test_ids = {e["id"] for e in s.test}
    pool = Counter(int(r["label"][1:]) for i, r in enumerate(rows) if i not in test_ids)  # 80 left after test
    assert sum(pool.values()) == 80
    assert _labels(s.train) == dict(enumerate(stratified_counts([pool[0], pool[1], pool[2]], 10)))
    rest = pool - _labels(s.train)
    assert _labels(s.dev) == dict(enumerate(stratified_counts([rest[0], rest[1], rest[2]], 20)))
    assert len(s.train) == 10 and len(s.dev) == 20 and len(s.test) == 20
    ids = [e["id"] for e in (*s.train, *s.dev, *s.test)]
    assert len(ids) == len(set(ids))  # one split: train, dev and test never share an example
    same, other = load_splits(path, seed=0, **kw), load_splits(path, seed=1, **kw)
    assert [e["id"] for e in same.train] == [e["id"] for e in s.train]
    assert [e["id"] for e in same.dev] == [e["id"] for e in s.dev]
    assert [e["id"] for e in other.train] != [e["id"] for e in s.train]
    assert [e["id"] for e in other.test] == [e["id"] for e in s.test]  # test is drawn with a fixed seed
    assert s.manifest()["train"]["ids"] == [e["id"] for e in s.train]


def test_stratified_with_a_train_and_a_test_split(tmp_path):
    """Train and dev come from the training split only; the test split is left whole (test_size=0)."""
    header = ("sentence", "label", "idx")
    train = [(f"train {i}", int(i % 4 == 0), i) for i in range(40)]  # 10 of class 1, 30 of class 0
    rows = "".join("\t".join(map(str, r)) + "\n" for r in [header, *train])
    (tmp_path / "train.tsv").write_text(rows)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\tidx\n" + "".join(f"val {i}\t{i % 2}\t{i}\n" for i in range(6)))
    files = {"train": str(tmp_path / "train.tsv"), "validation": str(tmp_path / "dev.tsv")}
    s = load_splits("sst2", protocol="stratified", train_size=8, dev_size=12, test_size=0, data_files=files)
    assert _labels(s.train) == {0: 6, 1: 2} and _labels(s.dev) == {0: 9, 1: 3} and len(s.test) == 6
    assert s.sources == {"train": "train", "dev": "train", "test": "validation"}
    assert not {e["id"] for e in s.train} & {e["id"] for e in s.dev}
    with pytest.raises(ValueError, match=r"train_size=30 \+ dev_size=11 exceeds the 40 training examples available"):
        load_splits("sst2", protocol="stratified", train_size=30, dev_size=11, data_files=files)


def test_stratified_refuses_what_the_pool_cannot_give(tmp_path):
    path = _pool_file(tmp_path)
    with pytest.raises(ValueError) as err:
        load_splits(path, protocol="stratified", train_size=50, dev_size=40, test_size=20)
    message = str(err.value)
    assert "\n" not in message
    assert "train_size=50 + dev_size=40 exceeds the 80 training examples available" in message
    assert "lower data.train_size or data.dev_size, or data.test_size (20 examples are held out for test)" in message
    with pytest.raises(ValueError, match=r"data\.train_size must be >= 1 with data\.protocol=stratified"):
        load_splits(path, protocol="stratified", dev_size=10)
    assert len(load_splits(path, protocol="stratified", train_size=60, dev_size=20, test_size=20).dev) == 20


def test_stratified_regression_splits_at_the_median(tmp_path):
    header = ("sentence1", "sentence2", "label")
    scores = [i / 10 for i in range(50)]  # 0.0 .. 4.9: 25 below the median 2.45, 25 above
    train = "".join("\t".join(map(str, (f"a {i}", f"b {i}", y))) + "\n" for i, y in enumerate(scores))
    (tmp_path / "train.tsv").write_text("\t".join(header) + "\n" + train)
    (tmp_path / "dev.tsv").write_text("\t".join(header) + "\n" + "x\ty\t1.0\n")
    files = {"train": str(tmp_path / "train.tsv"), "validation": str(tmp_path / "dev.tsv")}
    s = load_splits("stsb", protocol="stratified", train_size=10, dev_size=6, data_files=files)
    assert sum(e["label"] < 2.45 for e in s.train) == 5 and sum(e["label"] < 2.45 for e in s.dev) == 3


def test_config_keys():
    assert DataConfig(protocol="stratified", train_size=100).train_size == 100
    with pytest.raises(ConfigError, match=r"data\.train_size must be >= 1 with data\.protocol=stratified"):
        DataConfig(protocol="stratified")
    with pytest.raises(ConfigError, match=r"data\.dev_size must be >= 1 with data\.protocol=stratified"):
        DataConfig(protocol="stratified", train_size=10, dev_size=0)
    with pytest.raises(ConfigError, match=r"data\.protocol='strat' is not one of"):
        DataConfig(protocol="strat")
    cfg = load_config(None, ["data.protocol=stratified", "data.train_size=500", "data.dev_size=1000"])
    assert (cfg.data.protocol, cfg.data.train_size, cfg.data.dev_size) == ("stratified", 500, 1000)
    assert Config().data.train_size is None


def test_a_resume_must_agree_on_train_size(tmp_path):
    """data.train_size is part of a run; a run saved before the key existed (no train_size) still resumes."""
    from dist_subspace.training.preflight import RUN_IDENTITY, check_same_run

    assert "data.train_size" in RUN_IDENTITY and "data.protocol" in RUN_IDENTITY
    cfg = load_config(None, ["data.protocol=stratified", "data.train_size=100"])
    saved = cfg.to_dict()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_same_run(cfg, tmp_path, "the run")
    other = load_config(None, ["data.protocol=stratified", "data.train_size=500"])
    with pytest.raises(ConfigError, match=r"its data\.train_size=100, this config's 500"):
        check_same_run(other, tmp_path, "the run")
    old = Config().to_dict()
    del old["data"]["train_size"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_same_run(Config(), tmp_path, "the run")
