"""Generation's bench on a tiny model: the sides compute the language model's loss on the response, the centroid
decodes what the prefix written out decodes, the ensemble's two ways decode the same, the padding arithmetic."""

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench
from benchmarks.generation import decode_bench, decode_sides, ensemble_sides
from benchmarks.padding import grouped_widths
from benchmarks.sides import SIDES, BenchSpec, build_workload

TINY = ["--model", "tiny-llama", "--batch", "2", "--seq-len", "24", "--prefix-length", "4"]


def test_the_limit_side_loss_is_transformers_own_loss_on_the_response_tokens():
    spec = BenchSpec(
        model="tiny-llama", batch=3, seq_len=24, prefix_length=4, device="cpu", dtype="float32", task="generation"
    )
    w = build_workload(spec)
    assert w.generation and (w.labels != -100).sum() == 3 * 6  # the last quarter of each row: the response
    side = SIDES["limit"](w)
    with torch.no_grad():
        ours = side.loss()
        theirs = w.backbone(input_ids=w.input_ids, attention_mask=w.attention_mask, labels=w.labels).loss
        logits = w.backbone(input_ids=w.input_ids).logits[:, :-1]  # by hand: next-token CE on the response
        by_hand = F.cross_entropy(logits.flatten(0, 1), w.labels[:, 1:].flatten(), ignore_index=-100)
    assert side.head_rows == 3 * 6  # the head runs on the response positions only
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, by_hand)


def test_every_generation_side_trains_on_the_same_loss_and_its_prefix_only():
    spec = BenchSpec(
        model="tiny-llama", batch=2, seq_len=16, prefix_length=4, device="cpu", dtype="float32", task="generation"
    )
    w = build_workload(spec)
    before = {n: p.clone() for n, p in w.backbone.named_parameters()}
    for name in ("limit", "peft", "k1", "k3"):
        side = SIDES[name](w)
        loss = side.loss()
        assert loss.dim() == 0 and torch.isfinite(loss) and 0 < loss.item() < 10  # CE over a 128-id vocabulary
        side.step()
    for n, p in w.backbone.named_parameters():
        assert torch.equal(p, before[n]), n


def test_the_centroid_decodes_what_its_prefix_written_out_decodes():
    b = decode_bench("tiny-llama", prompts=3, prefix_length=4)
    out = {name: side() for name, side in decode_sides(b, 5).items()}
    assert all(t.shape == (3, 5) for t in out.values())
    assert torch.equal(out["centroid"], out["written"]) and torch.equal(out["centroid"], out["hf_prefix"])
    assert torch.equal(out["centroid"], out["peft"])  # PEFT's own generate with the exported centroid, left padded
    assert not torch.equal(out["centroid"], out["limit"])  # the prefix changes what is decoded


def test_stacked_and_separate_ensembles_decode_each_point_alike():
    b = decode_bench("tiny-llama", prompts=2, prefix_length=4)
    sides = ensemble_sides(b, 4, points=3)
    stacked, separate = sides["stacked:3"](), sides["separate:3"]()
    assert stacked.shape == (2, 4) and separate.shape == (2, 3, 4)  # the mixture's answer; each point's own


def test_grouping_by_length_never_widens_a_batch():
    lengths = [5, 50, 6, 48, 7, 49, 8, 47]
    order = list(range(8))
    plain = grouped_widths(lengths, order, micro=2, window=2)
    assert plain == [50, 48, 49, 47]  # each micro-batch holds a short and a long example
    epoch = grouped_widths(lengths, order, micro=2, window=8)
    assert sorted(epoch) == [6, 8, 48, 50] and sum(epoch) < sum(plain)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "decode", "ensemble"])
def test_each_generation_mode_prints_its_table_or_json(mode, capsys):
    extra = ["--no-memory"] if mode == "train" else ["--prompts", "2", "--max-new-tokens", "3", "--points", "2"]
    args = [*TINY, "--generation", mode, "--rounds", "2", "--warmup", "0", *extra]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["command"].startswith("python -m benchmarks.bench")
    if mode == "train":
        assert set(result["sides"]) == {"limit", "peft", "k1", "k3"}
        assert result["sides"]["peft"]["head_rows"] == 2 * 24 > result["sides"]["k3"]["head_rows"]
    elif mode == "decode":
        assert result["tokens"]["centroid_equals_written"] and result["tokens"]["all_decoded_max_new_tokens"]
    else:
        assert set(result["speedup"]) == {"ensemble:2"}
    assert bench.main([*args, "--table"]) == 0
    assert capsys.readouterr().out.startswith("tiny-llama, float32")


def test_bad_generation_flags_fail_in_one_line(capsys):
    assert bench.main([*TINY, "--generation", "ensemble", "--points", "0,x"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--points" in err[0]
