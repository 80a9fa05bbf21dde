"""The attention measurements run end to end on tiny shapes (the real figures: docs/attention.md, the GPU script)."""

import torch

from benchmarks.attention_gpu import gpu_report
from benchmarks.attention_steps import compare_padding, compare_steps, random_batch
from tests.conftest import tiny_backbone


def test_compare_steps_times_every_side_and_the_prefix_path_saves_less():
    backbone = tiny_backbone("llama")
    ids, mask = random_batch(128, 2, 12, "cpu")
    out = compare_steps(backbone, ids, mask, [5, 6], rounds=2, prefix_length=4)
    assert set(out["step_s"]) == {"limit", "prefix", "default", "peft"}
    assert all(len(t) == 2 for t in out["step_s_all"]["cpu"].values()) and out["clock"] == "cpu"
    assert {"prefix_over_limit", "prefix_over_default", "prefix_over_peft"} <= out["ratios"]["paired"].keys()
    # the default path also saves the repeated key/value heads and a [B, 1, S, P+S] mask
    assert out["prefix_saved_over_default"] < 1
    assert out["attention_paths"]["prefix"] == {"causal: one [S, P+S] mask for the batch": 2}
    assert out["attention_paths"]["default"] == {}  # transformers' own SDPA


def test_gpu_report_runs_on_cpu_with_tiny_shapes():
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2, vocab_size=128)
    report = gpu_report(lengths=(16, 520), num_layers=1, rounds=2, prefix_length=4, shape=shape, dtype=torch.float32)
    short, long = report["lengths"]["16"], report["lengths"]["520"]
    assert short["attention_paths"] == {"causal: one [S, P+S] mask for the batch": 1}
    assert long["attention_paths"] == {"causal: query padded to a square, is_causal": 1}
    for row in (short, long):
        assert row["kernels"]["prefix"] == ["flash"]  # SDPA's flash kernel for CPU, grouped heads and all
        assert "flash_attention" in row["prefix_runs_alone_on"]
        assert row["equality"]["logits_max_abs"] < 1e-4 and row["equality"]["grad_max_rel"] < 1e-4
        assert set(row["step_s"]) == {"limit", "prefix", "default"}


def test_compare_padding_runs_right_padding_without_a_mask_and_left_padding_with_one():
    backbone = tiny_backbone("llama")
    ids, mask = random_batch(128, 3, 10, "cpu")
    mask[1, 6:] = mask[2, 3:] = 0  # right-padded rows
    out = compare_padding(backbone, ids * mask, mask, [5, 6], rounds=2, prefix_length=4)
    assert set(out["step_s"]) == {"limit", "before", "prefix_left", "prefix_right"}
    assert out["real_tokens"] == 10 + 6 + 3
    assert out["attention_paths"] == {
        "prefix_left": {"causal: [B, 1, S, P+S] mask": 2},
        "prefix_right": {"causal: one [S, P+S] mask for the batch": 2},
    }
    assert "prefix_right_over_before" in out["ratios"]["paired"]
