"""The planner command: what it reads (config.json, folder, alias, hub id, run config, DeepSpeed JSON), what it
prints (one JSON object, or a table), its one-line errors; and docs/scale.md's plans are its current output."""

import json
import re

import pytest

from dist_subspace.core.paths import CHECKOUT as ROOT
from dist_subspace.plan import main, parse_bytes
from tests.conftest import tiny_backbone


def plan_json(capsys, *argv: str) -> dict:
    capsys.readouterr()  # drop what came before (a save's progress bar)
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_hub_id_alias_folder_and_file_all_resolve(capsys, tmp_path):
    by_id = plan_json(capsys, "--model", "meta-llama/Llama-3.1-8B", "--gpus", "8")
    assert by_id["model_config"] == "configs/models/llama-3.1-8b.json" and by_id["parameters"]["total"] == 8_030_261_248
    assert by_id["fits"] and by_id["smallest_fix"] is None and by_id["ds_config"] == "ds_configs/zero3_bf16.json"
    assert set(by_id["per_gpu_bytes"]) == {
        "backbone_shard",
        "gathered_parameters",
        "activations",
        "mixed_prefix",
        "simplex_and_adamw",
        "logits",
        "runtime_overhead",
    }
    assert by_id["total_bytes"] == sum(by_id["per_gpu_bytes"].values())
    assert plan_json(capsys, "--model", "smollm2-135m")["parameters"]["total"] == 134_515_008
    tiny_backbone("gemma2").save_pretrained(tmp_path / "gemma")
    folder = plan_json(capsys, "--model", str(tmp_path / "gemma"), "--gpus", "2")
    assert folder["model_type"] == "gemma2"
    assert plan_json(capsys, "--model", str(tmp_path / "gemma" / "config.json"))["parameters"] == folder["parameters"]


def test_run_config_supplies_the_run_and_flags_override_it(capsys):
    run = plan_json(capsys, "--config", "configs/llama3_70b_sst2.yaml")
    s = run["setup"]
    assert (s["micro_batch"], s["seq_len"], s["prefix_length"], s["vertices"]) == (4, 128, 16, 3)
    assert run["model"] == "meta-llama/Llama-3.1-70B" and run["fits"]
    override = plan_json(capsys, "--config", "configs/llama3_70b_sst2.yaml", "--micro-batch", "16", "--gpus", "2")
    assert override["setup"]["micro_batch"] == 16 and not override["fits"]
    assert override["smallest_fix"]["changes"][0] == "model.gradient_checkpointing=true"


def test_deepspeed_config_decides_partitioning_and_offload(capsys):
    offload = plan_json(capsys, "--model", "llama-3.1-70b", "--ds-config", "zero3_offload")
    assert offload["setup"]["offload_params"] and offload["cpu_offloaded_params_per_node"] > 0
    replicated = plan_json(capsys, "--model", "llama-3.1-70b", "--ds-config", "zero2")
    assert not replicated["setup"]["partitioned"] and not replicated["fits"]
    assert replicated["smallest_fix"]["changes"][-1] == "engine.deepspeed=zero3_bf16"


def test_table_is_readable(capsys):
    assert main(["--model", "mistralai/Mixtral-8x7B-v0.1", "--gpus", "8", "--table"]) == 0
    out = capsys.readouterr().out
    assert "46.70B parameters" in out and "per GPU" in out and re.search(r"total +[0-9.]+ GiB +fits", out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nobody/nothing"], "--model 'nobody/nothing': no config.json there"),
        (["--model", "llama-3.1-8b", "--gpu-memory", "lots"], "'lots' is not a size"),
        (["--model", "llama-3.1-8b", "--gpus", "0"], "--gpus and --nodes must be >= 1"),
        (["--model", "llama-3.1-8b", "--ds-config", "zero9"], "--ds-config 'zero9': no such file"),
        (["--gpus", "8"], "give --model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_unknown_family_is_refused(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    assert main(["--model", str(tmp_path)]) == 2
    assert "the planner does not know model_type 'gpt2'" in capsys.readouterr().err


def test_an_auto_that_nothing_fills_is_one_line_in_plan_and_train(capsys, tmp_path):
    """Accelerate fills the bucket sizes' "auto", not stage3_max_live_parameters': refused by name, not a traceback,
    by the planner and by the trainer's DeepSpeed check alike; the keys Accelerate fills stay accepted."""
    import torch

    from dist_subspace.core.config import ConfigError, load_config
    from dist_subspace.training.settings import check_ds_config

    zero = {"stage": 3, "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}
    filled = tmp_path / "filled.json"
    filled.write_text(json.dumps({"zero_optimization": zero}))
    assert plan_json(capsys, "--model", "llama-3.1-8b", "--ds-config", str(filled))["fits"]
    ds = {"zero_optimization": {**zero, "stage3_max_live_parameters": "auto"}}
    unfilled = tmp_path / "unfilled.json"
    unfilled.write_text(json.dumps(ds))
    assert main(["--model", "llama-3.1-8b", "--ds-config", str(unfilled)]) == 2
    err = capsys.readouterr().err
    message = 'sets zero_optimization.stage3_max_live_parameters="auto", which nothing fills'
    assert err.startswith(f"error: --ds-config {unfilled} {message}") and err.count("\n") == 1
    with pytest.raises(ConfigError, match=message):
        check_ds_config(ds, load_config(None, []), torch.float32, 1, cuda=False)


def test_sizes_parse():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("1024") == 1024


@pytest.mark.parametrize("name", ["llama3_8b_sst2", "llama3_70b_sst2"])
def test_readme_shows_the_current_plans(capsys, name):
    """docs/scale.md's plan blocks are exactly what the command prints now."""
    argv = ["--config", f"configs/{name}.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--table"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()
    readme = (ROOT / "docs" / "scale.md").read_text()
    block = re.search(rf"python -m dist_subspace.plan --config configs/{name}.yaml [^\n]*\n(.*?)\n```", readme, re.S)
    assert block is not None, f"docs/scale.md has no plan block for {name}"
    assert block.group(1).strip() == printed
