"""The trainer in one process on a small real model: the run-folder contract, resume, export, config errors."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_subspace.core import simplex
from dist_subspace.core.config import ConfigError, load_config
from dist_subspace.train import main
from dist_subspace.training.schedule import step_examples
from tests.conftest import run_args

pytestmark = pytest.mark.slow


def test_step_examples_cover_epochs_and_depend_only_on_seed_and_step():
    first_epoch = step_examples(10, 0, 0, 4) + step_examples(10, 0, 1, 4) + step_examples(10, 0, 2, 4)[:2]
    assert sorted(first_epoch) == list(range(10))  # every example once per epoch
    assert step_examples(10, 0, 2, 4) == step_examples(10, 0, 2, 4)
    assert step_examples(10, 0, 2, 4) != step_examples(10, 1, 2, 4)


@pytest.fixture(scope="module")
def finished_run(small_assets, tmp_path_factory):
    model_dir, data = small_assets
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(run_args(model_dir, data, out, "simplex.vertices=3", "train.trace=true")) == 0
    return out


def test_run_folder_contract(finished_run):
    out = finished_run
    config = load_config(out / "config.yaml")  # the resolved config loads back
    assert config.simplex.vertices == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "split" in r for r in rows)
    train = [r for r in rows if r["split"] == "train"]
    assert {"loss", "lr", "examples_per_s", "grad_norm"} <= set(train[0])
    assert sum(r["loss"] for r in train[-2:]) < sum(r["loss"] for r in train[:2])  # it learns
    assert {r["split"] for r in rows} == {"train", "dev", "test"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-6"]
    tensors = load_file(str(out / "final" / "simplex.safetensors"))
    assert list(tensors) == ["prefix.vertices"]
    assert tensors["prefix.vertices"].shape == (3, 4, 2, 3, 8, 64)  # [K, L, 2, H_kv, P, D]
    info = json.loads((out / "final" / "simplex_config.json").read_text())
    assert info["num_vertices"] == 3 and info["prefix_length"] == 8 and info["sampling"] == "example_layer"
    summary = json.loads((out / "summary.json").read_text())
    assert {"test_initial", "test_final", "selected_step"} <= set(summary)
    manifest = json.loads((out / "examples.json").read_text())
    assert len(manifest["train"]["ids"]) == 16 and not set(manifest["train"]["ids"]) & set(manifest["dev"]["ids"])
    assert (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_folder_names_no_module_path_so_it_outlives_a_move(finished_run):
    """What a run writes is safetensors, JSON, YAML, PNG and the model card's prose: nothing pickled, nothing that
    names where a class of this package lives (a run folder made before the layers moved still loads)."""
    from safetensors import safe_open

    for path in (p for p in finished_run.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                assert f.keys() is not None  # a safetensors header, no pickle
            continue
        assert path.suffix in (".json", ".jsonl", ".yaml", ".png", ".md"), path
        assert not data.startswith(b"\x80"), path  # a pickle's protocol byte
        if path.suffix != ".md":  # the card quotes the command (python -m dist_subspace.train ...), as prose
            assert b"dist_subspace." not in data, path


def test_trace_matches_the_stateless_sampler(finished_run):
    trace = load_file(str(finished_run / "ranks" / "trace-rank-0.safetensors"))
    index, alpha = trace["step5.micro0.index"], trace["step5.micro0.alpha"]
    want = simplex.sample_alpha(0, torch.tensor(5), index, 3, 4, "example_layer")
    torch.testing.assert_close(alpha, want, rtol=0, atol=0)


def test_peft_export_loads_in_peft_and_matches_our_centroid(finished_run, small_assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_subspace.core.model import PrefixSubspaceModel
    from dist_subspace.data.batching import label_token_ids
    from dist_subspace.training.checkpoint import load_simplex_tensors

    model_dir, _ = small_assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(["the film was superb", "the film was dull"], return_tensors="pt")  # same length: no padding
    assert ids["attention_mask"].all()
    words = label_token_ids(tokenizer, [" negative", " positive"])
    ours = PrefixSubspaceModel(AutoModelForCausalLM.from_pretrained(model_dir), 3, 8, label_token_ids=words)
    load_simplex_tensors(ours, load_file(str(finished_run / "final" / "simplex.safetensors")))
    want = ours(ids["input_ids"], ids["attention_mask"], simplex.centroid_alpha(3))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), str(finished_run / "final" / "peft_centroid")
    )
    got = peft_model(**ids).logits[:, -1, words]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_resume_ends_with_the_same_simplex(finished_run, small_assets, tmp_path):
    """Stop after the step-6 checkpoint (drop everything later), resume with train.resume=auto."""
    model_dir, data = small_assets
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    for later in ("checkpoints/step-12", "final", "summary.json"):
        shutil.rmtree(out / later) if (out / later).is_dir() else (out / later).unlink()
    assert main(run_args(model_dir, data, out, "simplex.vertices=3", "train.resume=auto")) == 0
    for name in ("checkpoints/step-12/simplex.safetensors", "final/simplex.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(finished_run / name))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = json.loads((out / "checkpoints/step-12/trainer_state.json").read_text())
    assert state["step"] == 12
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys))  # rows logged after the checkpoint were dropped, then logged once


def test_resuming_an_older_checkpoint_sets_the_abandoned_trajectory_aside_and_applies_a_new_lr(
    finished_run, small_assets, tmp_path, capsys
):
    """Resume at step 6 while step-12 exists, keeping one checkpoint, at twice the learning rate: the old step-12
    and the rows logged after step 6 move aside (kept), the new run's step-12 is not deleted as older, the log
    holds one trajectory, and the new rate is the one used."""
    model_dir, data = small_assets
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    old_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    args = [f"train.resume={out / 'checkpoints/step-6'}", "train.keep_checkpoints=1", "train.lr=0.02"]
    assert main(run_args(model_dir, data, out, "simplex.vertices=3", "eval.landscape=false", *args)) == 0
    printed = capsys.readouterr().out
    (aside,) = (out / "abandoned").iterdir()
    assert f"resuming at step 6: set aside step-12, {sum(r['step'] > 6 for r in old_rows)} metrics row" in printed
    assert "train.lr changed on resume: 0.01 -> 0.02, applied from step 7" in printed
    old12 = load_file(str(finished_run / "checkpoints/step-12/simplex.safetensors"))
    torch.testing.assert_close(load_file(str(aside / "step-12/simplex.safetensors")), old12, rtol=0, atol=0)
    assert "step-12" in {p.name for p in (out / "checkpoints").iterdir()}  # the new one, kept
    new12 = load_file(str(out / "checkpoints/step-12/simplex.safetensors"))
    assert not torch.equal(new12["prefix.vertices"], old12["prefix.vertices"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys))
    set_aside = [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()]
    assert set_aside == [r for r in old_rows if r["step"] > 6]
    lr = {r["step"]: r["lr"] for r in rows if r["split"] == "train"}
    old_lr = {r["step"]: r["lr"] for r in old_rows if r["split"] == "train"}
    assert lr[6] == old_lr[6] and lr[8] == pytest.approx(2 * old_lr[8]) and lr[12] == pytest.approx(2 * old_lr[12])


def test_a_resumed_run_that_dies_leaves_no_final_of_the_abandoned_trajectory(
    finished_run, small_assets, tmp_path, monkeypatch, capsys
):
    """Resume a finished run at step 6, and the resumed run dies at step 8: the old final/, summary and landscape
    moved aside with the abandoned trajectory, so evaluate refuses the folder instead of scoring the abandoned
    run's final/ as if it were this one's."""
    from dist_subspace.evaluate import main as evaluate_main
    from dist_subspace.training.guards import RunStopped
    from dist_subspace.training.recipe import Recipe

    model_dir, data = small_assets
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    train_step = Recipe.train_step

    def dies_at_step_8(self):
        if self.step == 7:
            raise RunStopped("killed at step 8")
        return train_step(self)

    monkeypatch.setattr(Recipe, "train_step", dies_at_step_8)
    args = [f"train.resume={out / 'checkpoints/step-6'}", "simplex.vertices=3"]
    assert main(run_args(model_dir, data, out, *args)) == 1
    assert "final, summary.json, landscape.json, landscape.png" in capsys.readouterr().out
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    (aside,) = (out / "abandoned").iterdir()
    assert (aside / "summary.json").read_text() == (finished_run / "summary.json").read_text()
    final = load_file(str(finished_run / "final/simplex.safetensors"))
    torch.testing.assert_close(load_file(str(aside / "final/simplex.safetensors")), final, rtol=0, atol=0)
    assert evaluate_main([str(out)]) == 2
    assert "final/simplex.safetensors not found" in capsys.readouterr().err


def test_a_budget_in_epochs_sets_the_steps_and_the_evaluations(small_assets, tmp_path, capsys):
    """16 training examples (8 per class), micro-batch 4, one process: 4 steps an epoch; 2.5 epochs are 10 steps,
    an evaluation every epoch is one every 4 steps (and at the last)."""
    model_dir, data = small_assets
    out = tmp_path / "run"
    args = ("train.epochs=2.5", "train.eval_every_epochs=1", "eval.landscape=false", "eval.initial_test=false")
    assert main(run_args(model_dir, data, out, *args)) == 0
    assert "train.epochs=2.5: 10 steps (4.00 per epoch)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "dev"] == [4, 8, 10]
    saved = load_config(out / "config.yaml").train
    assert (saved.max_steps, saved.eval_every, saved.epochs) == (10, 4, 2.5)


@pytest.mark.parametrize(
    ("examples", "world", "epochs", "steps"), [(16, 1, 1.0, 4), (16, 2, 1.0, 2), (17, 1, 1.0, 5), (96, 1, 10, 240)]
)
def test_epochs_become_steps_per_global_batch(examples, world, epochs, steps):
    cfg = load_config(None, [f"train.epochs={epochs}", "train.micro_batch_size=4"]).train
    cfg.resolve_budget(examples, world)
    assert cfg.max_steps == steps


def test_every_selection_rule_keeps_its_own_best_from_one_training(small_assets, tmp_path):
    """select_by=centroid with also_select_by=[sampled:2]: final/ holds the centroid's pick, final_by/sampled-2/ the
    sampled metric's, each the best dev row of its own rule; both are scored on test, and a resume keeps both."""
    model_dir, data = small_assets
    out = tmp_path / "run"
    extra = ("simplex.vertices=3", "eval.also_select_by=[sampled:2]", "eval.landscape=false", "train.eval_every=3")
    assert main(run_args(model_dir, data, out, *extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for rule, suffix, folder in (("centroid", "", "final"), ("sampled:2", "@sampled:2", "final_by/sampled-2")):
        dev = [r for r in rows if r["split"] == "dev" and r["mode"] == rule]
        best = max(dev, key=lambda r: (r["accuracy"], -r["step"]))
        assert len(dev) == 4 and summary[f"selected_step{suffix}"] == best["step"]
        config = json.loads((out / folder / "simplex_config.json").read_text())
        assert config["selected_by"] == rule and config["dev_score"] == best["accuracy"]
        assert 0 <= summary[f"test_final{suffix}"] <= 1
    assert summary["dev@sampled:2"] == max(r["accuracy"] for r in rows if r.get("mode") == "sampled:2")
    state = json.loads((out / "checkpoints/step-12/trainer_state.json").read_text())
    assert list(state["best"]["by"]) == ["centroid", "sampled:2"]
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "summary.json").unlink()
    assert main(run_args(model_dir, data, again, *extra, "train.resume=auto")) == 0
    assert json.loads((again / "summary.json").read_text()) == summary


@pytest.mark.parametrize(
    "args",
    [["eval.select_by=sampled:2"], ["eval.also_select_by=[sampled:2]"]],
    ids=["another select_by", "a new also_select_by"],
)
def test_a_resume_under_a_selection_rule_the_checkpoint_did_not_keep_is_refused(
    finished_run, small_assets, tmp_path, capsys, args
):
    """The finished run kept its best by the centroid: resuming it selecting by sampled:2 would judge only the steps
    after the checkpoint and name the centroid's pick sampled:2. Refused in one line, before anything loads; the
    same for a checkpoint written before rules were recorded (its run's config.yaml names its rule)."""
    model_dir, data = small_assets
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    resume = [f"train.resume={out / 'checkpoints/step-6'}", "simplex.vertices=3", *args]
    assert main(run_args(model_dir, data, out, *resume)) == 2
    err = capsys.readouterr().err
    assert "kept its best dev simplex by centroid, not by sampled:2" in err and len(err.splitlines()) == 1
    state_path = out / "checkpoints/step-6/trainer_state.json"
    state = json.loads(state_path.read_text())
    state["best"] = state["best"]["by"]["centroid"]  # the format before rules were recorded
    state_path.write_text(json.dumps(state))
    from dist_subspace.training.checkpoint import CHECKSUMS

    sums = json.loads((state_path.parent / CHECKSUMS).read_text())
    sums["trainer_state.json"] = hashlib.sha256(state_path.read_bytes()).hexdigest()
    (state_path.parent / CHECKSUMS).write_text(json.dumps(sums))
    assert main(run_args(model_dir, data, out, *resume)) == 2
    assert "kept its best dev simplex by centroid" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simplex.vertice=3"], "did you mean simplex.vertices"),
        (["simplex.vertices=three"], "simplex.vertices must be int"),
        (["simplex.sampling=token"], "simplex.sampling='token' is not one of"),
        (["train.max_steps=0"], "train.max_steps must be >= 1"),
        (["eval.mode=vertex"], "is not a mode"),
        (["model=small"], "model is a section"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
        (["engine.deepspeed=zero9"], "no such file"),
        (["data.task=no_such_task"], "unknown task"),
        (["data.shots_per_class=1000"], "fewer than"),
        (["eval.mode=vertex:3"], "use vertex:0 .. vertex:2"),
        (["eval.landscape_resolution=0"], "eval.landscape_resolution must be >= 1"),
        (["data.protocol=first_n", "data.first_n=8", "data.dev_size=0"], "data.dev_size must be >= 1"),
        (["model.name_or_path=/no/such/model"], "no model folder there"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(args, message, small_assets, tmp_path, capsys):
    model_dir, data = small_assets
    argv = [*run_args(model_dir, data, tmp_path / "run"), *args]
    if args[0] == "--config":
        argv = [*args, *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "final").exists()


def test_a_finished_run_is_never_overwritten(finished_run, small_assets, capsys):
    model_dir, data = small_assets
    before = (finished_run / "final" / "simplex.safetensors").read_bytes()
    assert main(run_args(model_dir, data, finished_run)) == 2
    assert "train.resume=auto" in capsys.readouterr().err
    assert (finished_run / "final" / "simplex.safetensors").read_bytes() == before


def test_cli_exit_code_from_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dist_subspace.train", "simplex.vertices=0", f"train.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip() == "error: simplex.vertices must be >= 1 (got 0)"


def test_config_rejects_unknown_yaml_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"did you mean train\.max_steps"):
        load_config(path)


def _stsb_files(folder) -> dict[str, str]:
    """GLUE STS-B format (sentence1, sentence2, label in [0, 5]): the score falls with the words replaced."""
    import random

    rng = random.Random(0)
    words = [
        "cat",
        "dog",
        "house",
        "tree",
        "river",
        "car",
        "city",
        "road",
        "music",
        "light",
        "water",
        "stone",
        "paper",
        "chair",
        "table",
    ]
    files = {}
    for split, n in (("train", 60), ("validation", 21)):
        rows = []
        for i in range(n):
            first = rng.sample(words, 5)
            changed = rng.randint(0, 5)
            second = first[: 5 - changed] + rng.sample([w for w in words if w not in first], changed)
            rows.append({"sentence1": " ".join(first), "sentence2": " ".join(second), "label": 5 - changed, "idx": i})
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    return files


@pytest.mark.parametrize("model", ["minilm-l6", "small-decoder"])
def test_regression_stsb_trains_and_evaluates(model, small_assets, tmp_path):
    model_dir, data = small_assets
    files = _stsb_files(tmp_path)
    name = str(model_dir) if model == "small-decoder" else model
    out = tmp_path / "run"
    data_files = "{{train: {}, validation: {}}}".format(files["train"], files["validation"])
    extra = [
        f"model.name_or_path={name}",
        "data.task=stsb",
        f"data.data_files={data_files}",
        "data.test_size=0",
        "data.shots_per_class=6",
        "train.max_steps=10",
        "train.lr=0.01",
        "eval.mode=ensemble:2",
    ]
    assert main([*run_args(model_dir, data, out), *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    assert test[-1]["n"] == 21 and {"pearson", "spearman"} <= set(test[-1]) and test[-1]["mode"] == "ensemble:2"
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    tensors = load_file(str(out / "final" / "simplex.safetensors"))
    if model == "minilm-l6":  # an encoder trains a simplex of regression heads: [K, 1, hidden]
        assert tensors["head.weight"].shape == (3, 1, 384) and tensors["head.bias"].shape == (3, 1)
        assert not (out / "final" / "peft_centroid").exists()


def test_encoder_classification_with_a_simplex_head(small_assets, tmp_path):
    model_dir, data = small_assets
    out = tmp_path / "run"
    argv = [*run_args(model_dir, data, out), "model.name_or_path=minilm-l6", "train.lr=0.01", "train.tensorboard=true"]
    assert main(argv) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    tensors = load_file(str(out / "final" / "simplex.safetensors"))
    assert tensors["prefix.vertices"].shape == (3, 6, 2, 12, 8, 32)  # MiniLM: 6 layers, 12 heads of 32
    assert tensors["head.weight"].shape == (3, 2, 384)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_zero2_config_runs_with_a_replicated_backbone(small_assets, tmp_path, capsys):
    model_dir, data = small_assets
    short = ("train.max_steps=2", "train.eval_every=2", "eval.landscape=false")
    assert main([*run_args(model_dir, data, tmp_path / "zero2"), "engine.deepspeed=zero2", *short]) == 0
    assert "ZeRO-2: frozen backbone replicated" in capsys.readouterr().out
    assert main([*run_args(model_dir, data, tmp_path / "plain"), *short]) == 0
    a, b = (load_file(str(tmp_path / name / "final" / "simplex.safetensors")) for name in ("zero2", "plain"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same optimizer code, same fp32 backbone on one process


def test_selected_simplex_is_the_best_dev_steps(finished_run, capsys):
    """final/ holds the simplex of the first step with the best dev score: re-scoring it on dev gives that score."""
    from dist_subspace.evaluate import main as evaluate_main

    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in rows if r["split"] == "dev"]
    best = max(dev, key=lambda r: (r["accuracy"], -r["step"]))
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["selected_step"] == best["step"]
    assert evaluate_main([str(finished_run), "--split", "dev"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == best["accuracy"]


@pytest.mark.parametrize(("granularity", "shape"), [("batch", (4, 3)), ("example", (4, 3))])
def test_batch_and_example_granularities_end_to_end(granularity, shape, small_assets, tmp_path):
    model_dir, data = small_assets
    out = tmp_path / "run"
    extra = (f"simplex.sampling={granularity}", "train.trace=true", "train.max_steps=2", "eval.landscape=false")
    assert main([*run_args(model_dir, data, out), *extra, "train.eval_every=2"]) == 0
    trace = load_file(str(out / "ranks" / "trace-rank-0.safetensors"))
    alpha, index = trace["step1.micro0.alpha"], trace["step1.micro0.index"]
    want = simplex.sample_alpha(0, torch.tensor(1), index, 3, 4, granularity)
    torch.testing.assert_close(alpha, want, rtol=0, atol=0)
    if granularity == "batch":
        assert alpha.shape == (3,)  # one point for the whole step
    else:
        assert alpha.shape == shape and not torch.allclose(alpha[0], alpha[1])


def test_beta_pushes_the_vertices_apart(small_assets, tmp_path):
    model_dir, data = small_assets
    cos2 = {}
    for beta in (0, 1):
        out = tmp_path / f"beta{beta}"
        extra = (f"simplex.beta={beta}", "train.max_steps=6", "train.eval_every=6", "eval.landscape=false")
        assert main([*run_args(model_dir, data, out), *extra, "train.log_every=6", "train.lr=0.05"]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        cos2[beta] = next(r for r in rows if r["split"] == "train")["cos2"]
    assert cos2[1] < cos2[0] - 0.01, cos2


def test_overrides_may_stand_on_both_sides_of_config(small_assets, tmp_path, capsys):
    """As launch/slurm.sh and launch/train.sh call it: key=value, --config FILE, key=value."""
    path = tmp_path / "c.yaml"
    path.write_text("simplex:\n  vertices: 2\n")
    assert main(["train.max_steps=0", "--config", str(path), "simplex.beta=0.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: train.max_steps must be >= 1 (got 0)"


def test_evaluate_command(finished_run, tmp_path, capsys):
    from dist_subspace.evaluate import main as evaluate_main

    assert evaluate_main([str(finished_run), "--split", "dev", "--mode", "vertex:2", "--landscape"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "vertex:2" and result["split"] == "dev" and result["n"] == 16
    assert result["metric"] == "accuracy" and result["value"] == result["accuracy"]
    assert (finished_run / "landscape.png").read_bytes()[:4] == b"\x89PNG"
    for argv, message in (
        ([str(tmp_path)], "pass the folder of a finished run"),
        ([str(finished_run), "--mode", "vertex:3"], "out of range for K=3"),
        ([str(finished_run), "--mode", "ensemble:0"], "is not a mode"),
    ):
        assert evaluate_main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after any model-loading progress bar
        assert last.startswith("error: ") and message in last, last


def test_final_has_a_model_card(finished_run):
    """final/README.md: front matter as PEFT's and the Trainer's cards (base_model, library_name, tags), K, P, the
    selected step and how it was selected, the test metric in its mode, and the command that trained it."""
    import yaml

    card = (finished_run / "final" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    summary = json.loads((finished_run / "summary.json").read_text())
    config = load_config(finished_run / "config.yaml")
    assert front["base_model"] == config.model.name_or_path and front["library_name"] == "dist_subspace"
    assert "prefix-subspace" in front["tags"] and front["metrics"] == ["accuracy"]
    assert "K = 3 vertices, P = 8 prefix tokens per layer" in card
    step = summary["selected_step"]
    assert f"the exported simplex is the one of step {step}, the best dev accuracy in `eval.select_by=centroid`" in card
    assert f"| selected (step {step}) | `centroid` | {summary['test_final']:.4f} |" in card
    assert "## Training command\n\n```bash\n" in card  # this process's command line (pytest's, here)
