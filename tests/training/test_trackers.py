"""Experiment trackers (``train.report_to``, Accelerate's) read back from their own files, and the model card of
every export (``final/README.md``)."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import yaml

from dist_subspace.core.config import ConfigError, load_config
from dist_subspace.data.tasks import TASKS, FewShotSplits
from dist_subspace.train import main
from dist_subspace.training.card import CardFacts, render_card, training_command
from dist_subspace.training.preflight import check_optional_packages
from dist_subspace.training.reporting import DEFAULT_PROJECT, flat_config, tracker_setup, tracker_values
from tests.conftest import run_args

TRAIN_PY = str(Path(__file__).resolve().parents[2] / "dist_subspace" / "train.py")  # sys.argv[0] of python -m


# ---- config, preflight, the pure parts -------------------------------------------------------------
def test_report_to_takes_a_list_a_comma_string_or_one_name_and_tensorboard_is_its_alias():
    assert load_config(None, ["train.report_to=[TensorBoard, mlflow]"]).train.trackers() == ["tensorboard", "mlflow"]
    assert load_config(None, ["train.report_to=tensorboard,mlflow"]).train.report_to == ["tensorboard", "mlflow"]
    assert load_config(None, ["train.report_to=wandb"]).train.trackers() == ["wandb"]
    assert load_config(None, ["train.report_to=none"]).train.trackers() == []
    assert load_config(None, []).train.trackers() == []
    alias = load_config(None, ["train.tensorboard=true", "train.report_to=[mlflow]"]).train
    assert alias.trackers() == ["mlflow", "tensorboard"]
    assert load_config(None, ["train.tensorboard=true", "train.report_to=[tensorboard]"]).train.trackers() == [
        "tensorboard"
    ]
    with pytest.raises(ConfigError, match="name the trackers"):
        load_config(None, ["train.report_to=all"])
    with pytest.raises(ConfigError, match=r"train.report_to must be list\[str\] or str"):
        load_config(None, ["train.report_to={a: 1}"])


@pytest.mark.parametrize(
    ("overrides", "block", "message"),
    [
        (["train.report_to=[tensorbord]"], None, "unknown tracker 'tensorbord'; did you mean tensorboard?"),
        (["train.report_to=[mlflow]"], "mlflow", "mlflow needs the mlflow package: pip install mlflow"),
        (["train.report_to=[wandb]"], "wandb", "pip install wandb (or pip install 'dist_subspace[trackers]')"),
        (["train.report_to=[comet_ml]"], "comet_ml", "pip install comet-ml"),
        (["train.tensorboard=true"], "tensorboard", "train.tensorboard=true needs the tensorboard package"),
    ],
)
def test_an_unknown_or_missing_tracker_is_one_line_naming_what_to_install(overrides, block, message, monkeypatch):
    if block:
        monkeypatch.setitem(sys.modules, block, None)  # what the import system sees when it is not installed
        monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ConfigError) as err:
        check_optional_packages(load_config(None, overrides))
    assert message in str(err.value) and "\n" not in str(err.value), err.value


def test_every_installed_tracker_passes_preflight():
    check_optional_packages(load_config(None, ["train.report_to=[tensorboard,mlflow,wandb]"]))


def test_the_config_and_the_rows_as_trackers_take_them():
    flat = flat_config(load_config(None, ["data.label_words=[bad, good]"]).to_dict())
    assert flat["simplex.vertices"] == 3 and flat["train.lr"] == 0.01 and flat["train.tensorboard"] is False
    assert flat["data.label_words"] == "['bad', 'good']" and flat["engine.deepspeed"] == "None"
    assert flat["train.report_to"] == "[]" and flat["data.data_files"] == "None"
    row = {"accuracy": 0.5, "n": 16, "mode": "centroid", "ok": True}
    assert tracker_values("dev", row, None, "centroid") == {"dev/accuracy": 0.5, "dev/n": 16}
    assert tracker_values("dev", row, 1, "centroid") == {"replica-1/dev/accuracy": 0.5, "replica-1/dev/n": 16}
    other = {"accuracy": 0.25, "mode": "ensemble:4"}  # eval.select_by or an extra test mode, at the same step
    assert tracker_values("test", other, None, "centroid") == {"test/ensemble:4/accuracy": 0.25}


def test_each_trackers_own_settings_win(tmp_path):
    out = tmp_path / "my-run"
    project, kwargs = tracker_setup(["mlflow", "wandb"], out, {})
    assert project == DEFAULT_PROJECT
    assert kwargs == {"mlflow": {"run_name": "my-run"}, "wandb": {"name": "my-run", "dir": str(out)}}
    env = {"WANDB_PROJECT": "theirs", "WANDB_NAME": "n", "WANDB_DIR": "/elsewhere", "WANDB_MODE": "offline"}
    project, kwargs = tracker_setup(["tensorboard", "wandb"], out, env)
    assert project == "theirs" and kwargs == {"wandb": {}}  # wandb.init then reads WANDB_NAME, WANDB_DIR itself


@pytest.mark.parametrize(
    ("argv", "env", "want"),
    [
        ([TRAIN_PY, "simplex.vertices=4", "--config", "my run.yaml"], {}, "python -m dist_subspace.train"),
        (["/x/.venv/bin/dist-subspace", "train", "train.max_steps=2"], {}, "dist-subspace train train.max_steps=2"),
        ([TRAIN_PY.replace("train.py", "__main__.py"), "train"], {}, "python -m dist_subspace train"),
        (
            [TRAIN_PY, "a=1"],
            {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2"},
            "torchrun --nnodes 2 --nproc_per_node 4 -m dist_subspace.train a=1",
        ),
        (
            [TRAIN_PY, "a=1"],
            {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no"},
            "accelerate launch --num_processes 2 -m dist_subspace.train a=1",
        ),
        (
            [TRAIN_PY, "--local_rank=1", "a=1"],
            {"WORLD_SIZE": "8", "LOCAL_SIZE": "8"},
            "deepspeed --num_gpus 8 --module dist_subspace.train a=1",
        ),
    ],
)
def test_the_training_command_is_the_one_typed_with_its_launcher(argv, env, want):
    got = training_command(argv, env)
    assert got.startswith(want), got
    if "my run.yaml" in argv:
        assert got == "python -m dist_subspace.train simplex.vertices=4 --config 'my run.yaml'"  # pastes back


def _no_mlflow_settings(mp: pytest.MonkeyPatch) -> None:
    """Remove every MLflow environment variable, as on a fresh install with nothing configured."""
    for name in [name for name in os.environ if name.startswith("MLFLOW_")]:
        mp.delenv(name)


@pytest.mark.parametrize("setting", ["none", "file-uri-alone"])
def test_mlflow_logs_with_no_setting_or_a_bare_file_uri_and_leaves_the_environment_as_it_was(
    setting, tmp_path, monkeypatch
):
    """mlflow-skinny 3 with nothing set defaults to ``sqlite:///mlflow.db`` (refused without SQLAlchemy) and refuses
    a ``file:`` store without ``MLFLOW_ALLOW_FILE_STORE``: the run logs to RUN/mlruns, or to the file store named,
    and MLflow's settings are as they were afterwards."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from dist_subspace.training.engine import Engine
    from dist_subspace.training.reporting import MetricsLog

    _no_mlflow_settings(monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    store = out / "mlruns"
    if setting == "file-uri-alone":
        store = tmp_path / "elsewhere"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    before, uri_before = dict(os.environ), mlflow.get_tracking_uri()
    cfg = load_config(None, ["train.report_to=[mlflow]", f"train.output_dir={out}", "simplex.vertices=2"])
    engine = Engine(cfg)
    try:
        MetricsLog(cfg, engine, [out]).start_trackers(os.environ)
        engine.log_metrics({"train/loss": 1.5}, 1)
        engine.log_metrics({"train/loss": 1.25, "dev/accuracy": 0.5}, 2)
    finally:
        engine.end()
    assert dict(os.environ) == before and mlflow.get_tracking_uri() == uri_before
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(DEFAULT_PROJECT).experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["simplex.vertices"] == "2" and run.data.params["train.report_to"] == "['mlflow']"
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")} == {1: 1.5, 2: 1.25}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "dev/accuracy")] == [(2, 0.5)]


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_a_lora_encoder_card_has_no_peft_prefix_and_parses():
    cfg = load_config(None, ["model.name_or_path=minilm-l6", "model.adapter=lora", "simplex.vertices=1"])
    splits = FewShotSplits(TASKS["sst2"], [{}] * 32, [{}] * 32, [{}] * 872)
    summary = {"test_initial": 0.5, "test_final": 0.75, "selected_step": 30, "mode": "centroid", "test_last": 0.7}
    facts = CardFacts("runs/lora", "encoder", 6, splits, summary, 0.8, "python -m dist_subspace.train", versions={})
    card = render_card(cfg, facts)
    front = _front_matter(card)
    assert front["base_model"] == "minilm-l6" and front["library_name"] == "dist_subspace" and "lora" in front["tags"]
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.75
    assert "LoRA: rank 8" in card and "peft_centroid" not in card and "load_run" not in card
    assert "| the last step, no selection (step 40) | `centroid` | 0.7000 |" in card


def test_the_card_says_how_a_stratified_run_drew_its_examples():
    cfg = load_config(None, ["data.protocol=stratified", "data.train_size=100", "data.dev_size=1000"])
    splits = FewShotSplits(TASKS["sst2"], [{}] * 100, [{}] * 1000, [{}] * 872)
    summary = {"test_initial": 0.5, "test_final": 0.75, "selected_step": 30, "mode": "centroid"}
    card = render_card(cfg, CardFacts("runs/s", "decoder", 30, splits, summary, 0.8, "python -m x", versions={}))
    assert "`stratified`: 100 training examples and 1000 dev examples, each stratified by class" in card


def test_a_generation_card_names_its_kind_its_decoding_and_every_test_metric():
    """A generation run's card: text generation (its pipeline tag too), selected by the lowest dev loss, and the
    selected simplex's every test score (the generation metrics and the loss), with how test was decoded."""
    cfg = load_config(
        None, ["data.task=bbc_headlines", "data.protocol=first_n", "data.first_n=100", "eval.max_new_tokens=24"]
    )
    splits = FewShotSplits(TASKS["bbc_headlines"], [{}] * 100, [{}] * 1000, [{}] * 1000)
    summary = {"test_initial": 0.05, "test_final": 0.21, "selected_step": 30, "mode": "centroid"}
    scores = {
        "loss": 3.25,
        "perplexity": 25.79,
        "bleu": 0.04,
        "chrf": 0.2,
        "rougeL": 0.21,
        "exact_match": 0.0,
        "n": 1000,
    }
    facts = CardFacts("runs/h", "decoder", 30, splits, summary, 3.1, "python -m x", versions={}, test_scores=scores)
    card = render_card(cfg, facts)
    front = _front_matter(card)
    assert front["pipeline_tag"] == "text-generation" and front["metrics"] == ["rougeL"]
    assert front["model-index"][0]["results"][0]["task"]["type"] == "text-generation"
    assert "- task: `bbc_headlines` (text generation), metric: rougeL" in card
    assert (
        "the exported simplex is the one of step 30, the lowest dev loss in `eval.select_by=centroid` (3.1000" in card
    )
    assert "| selected (step 30) | `centroid` | 0.2100 |" in card
    for row in ("| rougeL | 0.2100 |", "| bleu | 0.0400 |", "| exact_match | 0.0000 |", "| perplexity | 25.7900 |"):
        assert row in card
    assert "(greedy, at most `eval.max_new_tokens=24` tokens)" in card and "| n |" not in card
    assert "python -m dist_subspace.predict runs/h --data prompts.csv --out answers.csv --mode ensemble:8" in card
    classifier = render_card(
        load_config(None, []), CardFacts("runs/c", "decoder", 30, splits_of("sst2"), summary, 0.8, "x")
    )
    assert "(classification), metric: accuracy" in classifier and "the best dev accuracy" in classifier
    assert (
        _front_matter(classifier)["pipeline_tag"] == "text-classification" and "dist_subspace.predict" not in classifier
    )


def splits_of(task: str) -> FewShotSplits:
    return FewShotSplits(TASKS[task], [{}] * 32, [{}] * 32, [{}] * 872)


# ---- real runs, read back --------------------------------------------------------------------------
def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(out: Path) -> dict[str, dict[int, float]]:
    """Every number of metrics.jsonl as tracker tag -> {step: value}."""
    want: dict[str, dict[int, float]] = {}
    for row in _rows(out):
        values = {k: v for k, v in row.items() if k not in ("step", "split")}
        for tag, value in tracker_values(row["split"], values, None, "centroid").items():
            want.setdefault(tag, {})[row["step"]] = value
    return want


def _wandb_records(path: Path):
    """The records of a W&B transaction log (``run-ID.wandb``): LevelDB log blocks of protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""


@pytest.fixture(scope="module")
def tracked_run(small_assets, tmp_path_factory):
    """A 2-step real run logging to TensorBoard, MLflow (a local file store) and W&B (offline), launched as
    ``python -m dist_subspace.train ...`` (its sys.argv), with an extra test mode."""
    model_dir, data = small_assets
    root = tmp_path_factory.mktemp("trackers")
    out = root / "tracked"
    args = run_args(
        model_dir,
        data,
        out,
        "train.max_steps=2",
        "eval.landscape=false",
        "eval.extra_test_modes=[vertex:1]",
        "train.report_to=[tensorboard,mlflow,wandb]",
    )
    with pytest.MonkeyPatch.context() as mp:
        _no_mlflow_settings(mp)  # MLflow as installed, nothing set: it logs to RUN/mlruns
        mp.chdir(root)  # where MLflow's own default would have gone
        mp.setenv("WANDB_MODE", "offline")
        for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR"):
            mp.delenv(name, raising=False)
        for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(name, str(root / "wandb-home"))  # nothing written to the home folder
        mp.setattr(sys, "argv", [TRAIN_PY, *args])
        assert main(args) == 0
        assert not [name for name in os.environ if name.startswith("MLFLOW_")]  # none left for a later process
    assert not (root / "mlruns").exists() and not (root / "mlflow.db").exists()  # not in the working directory
    return out, root, args


@pytest.mark.slow
def test_tensorboard_events_hold_every_metrics_row_at_its_step(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = tracked_run
    events = EventAccumulator(str(out / "tensorboard"))  # where train.tensorboard=true always wrote
    events.Reload()
    want = _expected(out)
    assert {"train/loss", "dev/accuracy", "test/accuracy", "test/vertex:1/accuracy"} <= set(want)
    assert set(events.Tags()["scalars"]) == set(want)
    for tag, by_step in want.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag  # float32 in the event file
    assert sorted(want["test/accuracy"]) == [0, 2]  # the initial centroid at step 0, the selected simplex at 2
    (hparams,) = (out / "tensorboard").glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text())["simplex.vertices"] == 3


@pytest.mark.slow
def test_mlflow_run_holds_the_config_as_params_and_every_row_as_metrics(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    out, _, _ = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only with this
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())  # the run's own store, with no MLflow setting
    experiment = client.get_experiment_by_name(DEFAULT_PROJECT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    config = flat_config(load_config(out / "config.yaml").to_dict())
    assert run.data.params == {key: str(value) for key, value in config.items()}
    want = _expected(out)
    assert set(run.data.metrics) == set(want)
    for tag, by_step in want.items():
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)} == by_step, tag


@pytest.mark.slow
def test_wandb_offline_run_is_in_the_run_folder_with_its_history(tracked_run):
    out, _, _ = tracked_run
    (log,) = out.glob("wandb/offline-run-*/run-*.wandb")  # wandb's dir is the run folder, not the working directory
    history: dict[str, dict[int, float]] = {}
    config, names = {}, []
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = "/".join(item.nested_key) or item.key
                if not key.startswith("_"):
                    history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            names.append((record.run.project, record.run.display_name))
    assert names == [(DEFAULT_PROJECT, "tracked")]
    assert history == _expected(out)
    assert config["simplex.vertices"] == 3 and config["train.report_to"] == "['tensorboard', 'mlflow', 'wandb']"


@pytest.mark.slow
def test_the_model_card_says_what_was_trained_how_it_was_selected_and_how_to_load_it(tracked_run):
    out, _, args = tracked_run
    card = (out / "final" / "README.md").read_text()
    front = _front_matter(card)
    summary = json.loads((out / "summary.json").read_text())
    assert front["base_model"] == args[0].split("=", 1)[1] and front["library_name"] == "dist_subspace"
    assert {"prefix-tuning", "prefix-subspace"} <= set(front["tags"])
    result = front["model-index"][0]["results"][0]["metrics"][0]
    assert result["type"] == "accuracy" and result["value"] == summary["test_final"]
    assert "K = 3 vertices, P = 8 prefix tokens per layer" in card and "`example_layer`" in card
    assert f"the exported simplex is the one of step {summary['selected_step']}" in card
    assert "`eval.select_by=centroid`" in card
    assert f"| selected (step 2) | `centroid` | {summary['test_final']:.4f} |" in card
    assert f"| selected (step 2) | `vertex:1` | {summary['test_final_vertex:1']:.4f} |" in card
    assert f"| the initial simplex, before training | `centroid` | {summary['test_initial']:.4f} |" in card
    assert f'PeftModel.from_pretrained(base, "{out}/final/peft_centroid")' in card
    assert f'load_run("{out}")' in card
    assert "python -m dist_subspace.train model.name_or_path=" in card and "train.max_steps=2" in card
    sums = json.loads((out / "final" / "checksums.json").read_text())
    assert "README.md" in sums  # sealed with final/: verified like its other files


@pytest.mark.slow
def test_a_tracker_that_cannot_start_stops_the_run_in_one_line_before_the_model_loads(
    small_assets, tmp_path, monkeypatch, capsys
):
    from dist_subspace.training.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Engine, "load_backbone", refuse)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unsupported-scheme://nowhere")
    model_dir, data = small_assets
    assert main(run_args(model_dir, data, tmp_path / "run", "train.report_to=[mlflow]")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.report_to: mlflow could not start (") and len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_log_once(small_assets, tmp_path, monkeypatch):
    """torchrun with 2 processes and no MLflow setting: one MLflow run (in RUN/mlruns), one TensorBoard event file,
    and the card names the launcher."""
    from mlflow.tracking import MlflowClient

    from tests.training.test_distributed import launch, torchrun

    model_dir, data = small_assets
    out = tmp_path / "pair"
    extra = ("train.max_steps=2", "eval.landscape=false", "train.report_to=[mlflow,tensorboard]")
    _no_mlflow_settings(monkeypatch)
    launch(torchrun("dist_subspace.train", *run_args(model_dir, data, out, *extra)))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_name == "pair"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 1  # step 2, logged once
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    card = (out / "final" / "README.md").read_text()
    assert "torchrun --nproc_per_node 2 -m dist_subspace.train model.name_or_path=" in card
    assert "global batch 4 x 1 x 2 process(es)" in card
