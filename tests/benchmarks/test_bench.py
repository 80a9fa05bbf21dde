"""The bench and the GPU check run for real on a tiny model: every JSON field is there, the sides are fair."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import bench
from benchmarks.sides import SIDES, BenchSpec, build_workload, model_config, step_flops
from benchmarks.timing import interleaved_times, median_ci, ratios
from dist_subspace.core.paths import CHECKOUT as ROOT

TINY = ["--model", "tiny-llama", "--batch", "2", "--seq-len", "16", "--prefix-length", "4"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_bench_prints_one_json_object_with_every_field():
    sides = ["limit", "peft", "k1", "k3"]
    args = [*TINY, "--sides", ",".join(sides), "--rounds", "3", "--warmup", "1", "--compile", "eager"]
    result = json.loads(run([sys.executable, "-m", "benchmarks.bench", *args]).stdout)  # nothing else on stdout
    assert result["command"] == "python -m benchmarks.bench " + " ".join(args)
    setup = result["setup"]
    assert setup["model"] == "tiny-llama" and setup["batch"] == 2 and setup["seq_len"] == 16
    assert setup["prefix_length"] == 4 and setup["rounds"] == 3 and setup["clock"] == "cpu"
    assert list(result["sides"]) == sides
    for side in result["sides"].values():
        assert len(side["times_s"]) == len(side["wall"]["times_s"]) == 3
        assert 0 < side["min_s"] <= side["median_s"] and side["tokens_per_s"] > 0 and side["model_tflops_per_s"] > 0
        memory = side["memory"]
        assert memory["kind"] == "rss" and memory["peak_bytes"] >= memory["before_steps_bytes"] > 0
        assert memory["step_bytes"] == memory["peak_bytes"] - memory["before_steps_bytes"]
    for table in ("time_ratios", "wall_time_ratios"):
        assert set(result[table]) == {"over_limit", "over_peft", "over_k1"}
        for ref, row in result[table].items():
            ones = {"paired": 1.0, "paired_ci95": [1.0, 1.0], "median": 1.0, "min": 1.0}
            assert row[ref.removeprefix("over_")] == ones
            assert set(row) == set(sides) and all(r["paired"] > 0 for r in row.values())
    assert set(result["memory_ratios"]) == {"over_limit", "over_peft"}
    assert result["memory_ratios"]["over_peft"]["peft"] == {"peak_bytes": 1.0, "step_bytes": 1.0}
    mixing = result["sampler_mixer"]
    assert mixing["eager_s"] > 0 and 0 < mixing["share_of_k3_step"] < 1
    compiled = mixing["compiled"]
    assert compiled["fullgraph"] and compiled["backend"] == "eager"
    assert compiled["alpha_max_abs_diff"] == 0 and compiled["prefix_max_abs_diff"] == 0
    what = [t["what"] for t in result["targets"]]
    assert what == [
        "k3/k1 time",
        "k3/peft time",
        "k3/limit time",
        "k3/peft peak_memory",
        "k3/peft step_memory",
        "sampler+mixer share of a k3 step",
    ]
    assert all(isinstance(t["met"], bool) and t["value"] > 0 for t in result["targets"])


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    run(["bash", "launch/gpu_check.sh", "--dry-run", str(out)])
    result = json.loads(out.read_text())
    assert result["setup"]["dry_run"] and result["setup"]["model"] == "tiny-llama"
    speed = result["speed"]["16"]
    assert list(speed["sides"]) == ["limit", "peft", "k3"] and speed["setup"]["dtype"] == "bfloat16"
    for side in speed["sides"].values():
        assert "mfu" in side and side["memory"]["peak_bytes"] > 0
    for side in ("limit", "peft", "k3"):
        assert result["sdpa"][side]["backends"], result["sdpa"]  # the profiler saw an attention kernel
    for section in ("host_syncs", "cuda_graph"):
        assert result[section]["skipped"] == "no CUDA device (dry run)" and result[section]["seconds"] >= 0
    assert result["compile"]["compiled"]["fullgraph"]
    attention = result["attention"]["lengths"]["16"]  # the kernels section of issue 11, tiny and on CPU
    assert attention["equality"]["logits_max_abs"] < 1e-4 and attention["kernels"]["prefix"]
    assert result["modules_not_needed_but_imported"] == []  # no deepspeed, no datasets on this path


def test_every_side_trains_the_same_number_of_prefix_parameters_and_leaves_the_backbone_alone():
    spec = BenchSpec(model="tiny-llama", batch=2, seq_len=8, prefix_length=4, device="cpu", dtype="float32")
    w = build_workload(spec)
    before = w.backbone(input_ids=w.input_ids).logits
    sides = {name: build(w) for name, build in SIDES.items()}
    for side in sides.values():
        side.step()
    after = w.backbone(input_ids=w.input_ids).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)  # PEFT's wrapper and ours change nothing in it
    k1 = sides["k1"].trainable_params
    assert sides["limit"].trainable_params == 0 and sides["peft"].trainable_params == k1  # same P: same prefix
    assert sides["k3"].trainable_params == 3 * k1 and sides["k6"].trainable_params == 6 * k1
    assert w.input_ids.shape == (2, 8) and bool(w.attention_mask.all())


def test_rounds_alternate_their_order_and_ratios_pair_rounds():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(steps, rounds=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("abccbaabccba")  # warm-up round first, then alternating
    assert all(len(t) == 3 for clock in times.values() for t in clock.values())
    got = ratios({"x": [2.0, 4.0, 9.0], "ref": [1.0, 1.0, 3.0]}, "ref")["x"]
    assert got == {"paired": 3.0, "paired_ci95": [2.0, 4.0], "median": 4.0, "min": 2.0}  # 3 rounds: the range


@pytest.mark.slow
def test_identical_sides_measure_one_and_a_doubled_step_two():
    """Real steps, interleaved as the bench runs them: two sides doing the same work measure a ratio whose interval
    holds 1, and a side that steps twice measures about 2, with an interval that leaves 1 out."""
    spec = BenchSpec(model="tiny-llama", batch=4, seq_len=64, prefix_length=4, device="cpu", dtype="float32")
    w = build_workload(spec)
    a, b = SIDES["k3"](w), SIDES["k3"](w)
    steps = {"a": a.step, "b": b.step, "twice": lambda: (a.step(), a.step())}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bench runs on CPU: process CPU time is then this thread's work alone
    try:
        times = interleaved_times(steps, rounds=15, warmup=2, device=torch.device("cpu"))["cpu"]
    finally:
        torch.set_num_threads(threads)
    same, double = ratios(times, "a")["b"], ratios(times, "a")["twice"]
    assert same["paired_ci95"][0] <= 1.0 <= same["paired_ci95"][1], same
    assert 1.6 < double["paired"] < 2.4 and double["paired_ci95"][0] > 1.0, double


def test_median_confidence_interval_uses_binomial_order_statistics():
    values = [float(v) for v in range(1, 21)]  # n = 20: P(Binomial(20, 1/2) <= 5) = 0.021, <= 6: 0.058
    assert median_ci(values) == (6.0, 15.0)
    assert median_ci([5.0, 1.0, 3.0]) == (1.0, 5.0)


def test_step_flops_count_the_prefix_in_attention_only():
    config = model_config("tiny-llama")
    extra = step_flops(config, 2, 16, 4) - step_flops(config, 2, 16, 0)
    q_dim = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    assert extra == 3 * 4 * config.num_hidden_layers * 2 * q_dim * 16 * 4  # QK^T and AV over 4 more keys, x3


def test_a_model_from_an_inline_config():
    config = model_config('config:{"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2}')
    assert config.model_type == "llama" and config.num_hidden_layers == 1
    assert model_config("smollm2-135m") is None  # a model to load, not a config


@pytest.mark.parametrize(
    "flags",
    [
        ["--sides", "k3,k4"],
        ["--sides", "k3,k3"],
        ["--batch", "0"],
        ["--rounds", "0"],
        ["--dtype", "float64"],
        ["--model", "config:{not json"],
        ["--no-such-flag"],
    ],
)
def test_bad_flags_fail_with_one_line(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(bench.main([*flags, "--no-memory"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err


@pytest.mark.slow
def test_stacked_evaluation_serves_every_point_with_fewer_forwards_under_zero3(small_assets):
    """2 processes, ZeRO-3: 8 examples, ensemble:4, 8 rows per forward. Per point each rank scores 4 examples
    per forward (4 forwards); stacked, its 16 rows fill 2 forwards; the logits agree."""
    from benchmarks.evaluation import evaluation_facts, format_evaluation

    model_dir, _ = small_assets
    result = evaluation_facts(str(model_dir), examples=8, points=4, batch=8, rounds=1)
    assert result["setup"]["processes"] == 2 and result["setup"]["examples"] == 8
    assert result["forwards_per_rank"] == {"stacked": 2, "per_point": 4}
    # The same rows, batched differently: in fp32 summation order only; in bf16 (auto on a CPU with native bf16) a
    # few units of bf16's epsilon (2^-8) of the logits' scale.
    scale = result["max_abs_logit"] * (2**-6 if result["dtype"] == "bfloat16" else 1e-5)
    assert result["max_abs_logit_diff"] < max(scale, 1e-6)
    assert "speed-up of stacking" in format_evaluation(result)
