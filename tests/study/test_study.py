"""The study command: a 2-unit grid on the small decoder, interrupted and resumed to the same table."""

import json
import math
import re
import shutil
import statistics
from dataclasses import asdict
from pathlib import Path

import pytest

from dist_subspace.core.config import ConfigError, load_config
from dist_subspace.study.__main__ import main as study_main
from dist_subspace.study.fanout import source_commit
from dist_subspace.study.report import rebuild, select_lrs
from dist_subspace.study.spec import StudySpec, Unit, as_overrides, load_spec, run_overrides
from dist_subspace.study.spread import run_spread
from dist_subspace.study.stats import holm, paired, sign_flip_test

pytestmark = pytest.mark.slow


def _spec(tmp_path, small_assets, out) -> list[str]:
    model_dir, data = small_assets
    base = {
        "data.shots_per_class": 4,
        "data.test_size": 20,
        "train.max_steps": 4,
        "train.micro_batch_size": 4,
        "train.eval_every": 2,
        "train.save_every": 2,
        "train.log_every": 2,
        "eval.landscape": False,
        "data.template": TEMPLATE,  # a user's own prompt: braces, a colon, a newline
    }
    spec = tmp_path / "study.yaml"
    spec.write_text(
        json.dumps(
            {
                "output_dir": str(out),
                "tasks": [str(data)],
                "models": [str(model_dir)],
                "methods": ["none", "k1", "k1_last", "k3", "k3_sampled", "k3_sampled_ensemble"],
                "seeds": 2,
                "lrs": [0.01],
                "ensemble": 2,
                "sampled": 2,
                "base": base,
            }
        )
    )
    return [str(spec)]


TEMPLATE = "Review: {text}\nSentiment:"


def _table(out) -> dict:
    record = json.loads((out / "study.json").read_text())
    return {"table": record["table"], "selected_lr": record["selected_lr"]}


def test_study_fanned_out_interrupted_and_resumed_gives_the_same_table(small_assets, tmp_path, capsys):
    """The paper's method (k3_sampled) beside K = 1 and K = 3: once through submitit's local executor (each unit a
    job of its own), once through 2 local workers, interrupted after one unit and with a unit killed after its
    step-2 checkpoint, then resumed. Same table, rebuilt from study.json alone; every cell carries its commit."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert study_main([*_spec(tmp_path, small_assets, whole), "--launcher", "submitit-local", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "training 2 unit(s) through submitit-local" in printed  # k3_sampled is read from k3's runs
    assert len(list((whole / "submitit").glob("*_result.pkl"))) == 2  # two jobs ran
    table = _table(whole)
    (model,) = table["table"]
    rows = table["table"][model]
    assert set(rows) == {"none", "k1", "k1_last", "k3", "k3_sampled", "k3_sampled_ensemble"}
    task = next(iter(rows["k1"]))
    assert all(r[task]["n"] == 2 for r in rows.values())  # 2 seeds each
    assert rows["k3_sampled"][task]["vs_k1"]["n"] == 2 and rows["k3_sampled"]["vs_k1"]["tasks"] == 1
    assert 0 <= rows["k3_sampled"]["vs_k1"]["p"] <= rows["k3_sampled"]["vs_k1"]["p_holm"] <= 1
    assert (whole / "study.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((whole / "study.json").read_text())
    assert {c["commit"] for c in record["cells"]} == {source_commit()}  # None outside a git checkout
    spread = record["spread"][f"{model} {task} k3_sampled"]  # how much the trained simplex varies
    assert spread["seeds"] == 2 and 0 <= spread["cos2"] <= 1 and spread["sampled_dev_sd"] >= 0
    sampled = next(c for c in record["cells"] if c["method"] == "k3_sampled")
    config = load_config(Path(sampled["folder"]) / "config.yaml")
    assert sampled["folder"] == next(c["folder"] for c in record["cells"] if c["method"] == "k3" and c["seed"] == 0)
    assert config.eval.also_select_by == ["sampled:2"] and config.eval.extra_test_modes == ["ensemble:2"]
    assert record["questions"][model]["selection"]["all"]["pairs"] == 2  # k3_sampled − k3, the same runs
    for cell in record["cells"]:  # each run's selected step is its best dev row under its own rule (first on ties)
        rule = "sampled:2" if cell["method"] == "k3_sampled" else "centroid"
        rows = [json.loads(line) for line in (Path(cell["folder"]) / "metrics.jsonl").read_text().splitlines()]
        dev = [r for r in rows if r["split"] == "dev" and r["mode"] == rule]
        assert (
            len(dev) == 2 and cell["selected_step"] == max(dev, key=lambda r: (r[cell["metric"]], -r["step"]))["step"]
        )
        assert cell["dev"] == max(r[cell["metric"]] for r in dev)
    for config in whole.rglob("replica-0/config.yaml"):  # every run got the template as written
        assert load_config(config).data.template == TEMPLATE

    # Interrupted: one unit done, then stop; then a unit dies after its step-2 checkpoint.
    assert study_main([*_spec(tmp_path, small_assets, broken), "--stop-after", "1"]) == 0
    assert "stopped after 1 unit" in capsys.readouterr().out
    assert study_main([*_spec(tmp_path, small_assets, broken), "--workers", "2"]) == 0
    capsys.readouterr()
    unit = next(p for p in broken.rglob("lr-0.01") if p.parent.name == "k3")
    shutil.rmtree(unit / "checkpoints" / "step-4")
    for replica in ("replica-0", "replica-1"):
        shutil.rmtree(unit / replica / "final")
        (unit / replica / "summary.json").unlink()
    (unit / "unit.json").unlink()
    assert study_main([*_spec(tmp_path, small_assets, broken), "--workers", "2"]) == 0
    assert "resumed from" in (unit / "train.log").read_text()
    assert "training 1 unit(s)" in capsys.readouterr().out
    assert _table(broken) == table
    assert rebuild(broken / "study.json") == table  # the table comes back from study.json alone

    # --dry-run on a finished study: nothing left
    assert study_main([*_spec(tmp_path, small_assets, broken), "--dry-run"]) == 0
    assert "2 units (2 done)" in capsys.readouterr().out


def test_learning_rate_is_picked_on_dev_and_paired_test():
    cells = [
        {"task": "t", "model": "m", "method": "k1", "lr": lr, "seed": s, "dev": dev, "test": 0.5}
        for lr, dev in ((0.01, 0.6), (0.03, 0.7))
        for s in (0, 1)
    ]
    spec = StudySpec(lrs=[0.01, 0.03], seeds=2)
    assert select_lrs(cells, spec) == {("t", "m", "k1"): 0.03}
    assert select_lrs(cells[:-1], spec) == {}  # a rate not finished on every seed: no selection, never a narrower one
    losses = [{**c, "select_metric": "loss"} for c in cells]  # a generation task's dev loss: the lower rate wins
    assert select_lrs(losses, spec) == {("t", "m", "k1"): 0.01}
    result = paired({0: 0.8, 1: 0.7, 2: 0.9}, {0: 0.7, 1: 0.7, 2: 0.6})
    assert result["n"] == 3 and result["wins"] == 2 and result["ties"] == 1
    assert result["mean_diff"] == pytest.approx(0.1333333)
    half = 4.302653 * statistics.stdev([0.1, 0.0, 0.3]) / math.sqrt(3)  # t(0.975, 2 df) = 4.302653
    assert result["ci95"] == pytest.approx([0.4 / 3 - half, 0.4 / 3 + half])
    # Differences 0.1, 0, 0.3: t = mean / (sd / sqrt 3) = 1.5119 on 2 degrees of freedom, whose two-sided p has a
    # closed form (Student's t with 2 df: F(t) = 1/2 + t / (2 sqrt(2 + t^2))).
    t = 0.4 / 3 / (statistics.stdev([0.1, 0.0, 0.3]) / math.sqrt(3))
    assert result["t_p"] == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), rel=1e-6)
    assert result["t_p"] == pytest.approx(0.26970, abs=1e-5)
    # Wilcoxon drops the zero: two positive differences, ranks 1 and 2, W- = 0; exactly 1 of the 4 sign patterns
    # is as extreme on each side, so p = 2 / 4.
    assert result["wilcoxon_p"] == pytest.approx(0.5)


def test_sign_flip_test_is_exact_on_few_pairs_and_keeps_pairs_in_their_tasks():
    """Task t1: differences 0.1, 0, 0.3; task t2: 0.1, 0.05. The statistic is the mean of the task means,
    (0.1333 + 0.075) / 2. Of the 2^5 sign patterns, those as extreme are all-positive and all-negative nonzero
    differences, each twice (the zero flips freely): p = 4 / 32."""
    result = sign_flip_test({"t1": [(0.8, 0.7), (0.7, 0.7), (0.9, 0.6)], "t2": [(0.5, 0.4), (0.6, 0.55)]})
    assert result["tasks"] == 2 and result["pairs"] == 5
    assert result["mean_diff"] == pytest.approx((0.4 / 3 + 0.075) / 2)
    assert result["p"] == pytest.approx(4 / 32)
    # Pooling the pairs would weigh t1 by 3/5: the within-task mean differs from the pooled one.
    assert result["mean_diff"] != pytest.approx(0.55 / 5)


def test_holm_matches_the_textbook_step_down():
    """Holm (1979): p = 0.01, 0.04, 0.03 over 3 hypotheses -> 0.03, then max(0.03, 2 x 0.03) = 0.06, then
    max(0.06, 1 x 0.04) = 0.06."""
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}  # capped at 1


@pytest.mark.parametrize("value", ["{text} It was", "Review: {text}", "{text}\nLabel: {text_pair}\n", "a: b"])
def test_every_override_value_reaches_the_trainer_as_written(tmp_path, value):
    spec = StudySpec(base={"data.template": value, "train.max_steps": 3}, tasks=["rotten_tomatoes"], models=["m"])
    (run,) = run_overrides(spec, Unit("rotten_tomatoes", "m", "k1", 0.01), tmp_path)
    cfg = load_config(None, as_overrides(run))
    assert cfg.data.template == value and cfg.train.max_steps == 3 and cfg.train.output_dir == run["train.output_dir"]


def test_bad_study_specs_are_refused(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("methods: [k3_ensemble]\n")
    assert study_main([str(spec), "--dry-run"]) == 2
    assert "read from k3" in capsys.readouterr().err
    assert study_main([str(spec), "methodz=[k1]"]) == 2
    assert "did you mean methods" in capsys.readouterr().err


def test_centre_gap_reads_the_centroid_against_the_corners_of_a_landscape_grid(tmp_path):
    """A landscape as the trainer writes it (resolution 4 plus the centroid last): the gap is the centroid's metric
    minus the vertices' mean, and the range spans the whole grid."""
    points = [[i / 4, j / 4, (4 - i - j) / 4] for i in range(5) for j in range(5 - i)] + [[1 / 3] * 3]
    values = [0.5] * len(points)
    for p_i, p in enumerate(points):
        if max(p) == 1.0:
            values[p_i] = {0: 0.6, 1: 0.7, 2: 0.8}[p.index(1.0)]
    values[-1] = 0.9
    (tmp_path / "landscape.json").write_text(json.dumps({"points": points, "values": values, "metric": "accuracy"}))
    out = run_spread(tmp_path, "accuracy")
    assert out["centre_gap"] == pytest.approx(0.9 - 0.7)
    assert out["landscape_range"] == pytest.approx(0.9 - 0.5)


def test_compare_pairs_any_two_methods_derived_ones_included():
    """k3_last against k1_last: each read from its source's runs (test_last) at the source's dev-picked rate."""
    from dist_subspace.study.report import compare

    spec = StudySpec(tasks=["t"], models=["m"], methods=["k1", "k1_last", "k3", "k3_last"], lrs=[0.01], seeds=3)
    last = {"k1": [0.60, 0.70, 0.80], "k3": [0.62, 0.70, 0.83]}
    cells = [
        {"task": "t", "model": "m", "method": m, "lr": 0.01, "seed": s, "dev": 0.5, "test": 0.5, "test_last": v[s]}
        for m, v in last.items()
        for s in range(3)
    ]
    text = compare(spec, cells, "k3_last", "k1_last")
    assert "k3_last − k1_last" in text and "(2/3)" in text and "+1.7 [" in text  # mean of 2, 0, 3 points
    assert "+0.0 [+0.0, +0.0] (0/3) | +0.0 (p=1.000, 1 task)" in compare(spec, cells, "k3", "k1")  # 0.5 against 0.5


@pytest.mark.parametrize(
    ("key", "values", "named"),
    [
        ("lrs", [0.01, 0.01], "0.01"),
        ("lrs", [0.01, 0.0100000001], "0.01"),  # two rates that print alike name one folder, lr-0.01
        ("lora_lrs", [0.001, 0.001], "0.001"),
        ("methods", ["k1", "k3", "k1"], "k1"),
        ("tasks", ["rotten_tomatoes", "rotten_tomatoes/"], "rotten_tomatoes"),
        ("models", ["m", "m"], "m"),
    ],
)
def test_a_grid_entry_named_twice_is_refused_in_one_line(key, values, named):
    with pytest.raises(ConfigError, match=f"study {key} names '{re.escape(named)}' twice"):
        StudySpec(**{"tasks": ["rotten_tomatoes"], "models": ["m"], "methods": ["k1", "k3"], key: values})


def test_the_sampled_dev_sd_is_the_tasks_metric_not_the_first_sd_found(tmp_path):
    row = {"step": 4, "split": "dev", "mode": "sampled:8", "accuracy": 0.7, "accuracy_std": 0.01, "f1": 0.6}
    row["f1_std"] = 0.05
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    assert run_spread(tmp_path, "f1")["sampled_dev_sd"] == 0.05
    assert run_spread(tmp_path, "accuracy")["sampled_dev_sd"] == 0.01
    assert "sampled_dev_sd" not in run_spread(tmp_path, None)  # unknown metric: no SD rather than another's


def test_a_generation_runs_sampled_dev_sd_is_its_dev_loss_that_selects(tmp_path):
    """A generation task's metric is ROUGE-L on test, but its dev rows hold the loss that picks the checkpoint: the
    spread shows that loss's SD over the sampled points, not nothing."""
    from dist_subspace.study.spread import simplex_spread

    row = {"step": 50, "split": "dev", "mode": "sampled:4", "loss": 2.98, "loss_std": 0.015, "perplexity": 19.7}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    cell = {"task": "t", "model": "m", "method": "k3_sampled", "lr": 0.01, "selected_step": 50}
    cell |= {"folder": str(tmp_path), "metric": "rougeL", "select_metric": "loss"}
    spread = simplex_spread([cell], {("t", "m", "k3_sampled"): 0.01})
    assert spread["m t k3_sampled"]["sampled_dev_sd"] == 0.015


def _small_study(tmp_path, small_assets, out, methods=("k1", "k3"), **base) -> list[str]:
    model_dir, data = small_assets
    spec = {
        "output_dir": str(out),
        "tasks": [str(data)],
        "models": [str(model_dir)],
        "methods": list(methods),
        "seeds": 1,
        "lrs": [0.01],
        "base": {
            "data.shots_per_class": 4,
            "data.test_size": 10,
            "train.max_steps": 2,
            "train.micro_batch_size": 4,
            "train.eval_every": 2,
            "train.save_every": 2,
            "eval.landscape": False,
            **base,
        },
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(json.dumps(spec))
    return [str(path)]


@pytest.mark.parametrize("launcher", ["local", "submitit-local"])
def test_a_failed_unit_is_reported_and_the_others_cells_stay(small_assets, tmp_path, capsys, launcher):
    """One unit cannot even start (its folder is taken by a file): through threads or through a submitit job that
    raises, it is reported failed in study.md and in the exit status, and the other unit's cells are reported."""
    out = tmp_path / "study"
    args = _small_study(tmp_path, small_assets, out)
    spec = load_spec(args[0], [])
    k1 = Unit(spec.tasks[0], spec.models[0], "k1", 0.01).folder(out)
    k1.parent.parent.mkdir(parents=True)
    k1.parent.write_text("not a folder")  # OUT/task/model/k1 is a file
    assert study_main([*args, "--launcher", launcher, "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 1 unit(s) not trained:") and "k1 lr=0.01: FAILED" in err
    record = json.loads((out / "study.json").read_text())
    assert {c["method"] for c in record["cells"]} == {"k3"} and len(record["problems"]) == 1
    assert "FAILED" in (out / "study.md").read_text()
    assert record["table"][spec.models[0]]["k3"][spec.tasks[0]]["n"] == 1


def test_a_claimed_unit_is_not_trained_again_and_a_changed_spec_is_refused(small_assets, tmp_path, capsys):
    """A unit held by a live process (its claim's lock) is left alone: reported, exit 1, nothing written into it.
    Once trained, a rerun whose base differs is refused in one line naming the change, and --retrain-changed
    moves the old folder aside and trains it again."""
    from dist_subspace.study.state import claim

    out = tmp_path / "study"
    args = _small_study(tmp_path, small_assets, out, methods=("k1",))
    spec = load_spec(args[0], [])
    folder = Unit(spec.tasks[0], spec.models[0], "k1", 0.01).folder(out)
    with claim(folder) as held:
        assert held is not None
        assert study_main(args) == 1
        assert "CLAIMED (claimed by pid" in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == [".claim.lock", "claim.json"]
    assert study_main(args) == 0
    capsys.readouterr()
    summary = (folder / "summary.json").read_text()
    changed = _small_study(tmp_path, small_assets, out, methods=("k1",), **{"train.max_steps": 4})
    assert study_main(changed) == 2
    err = capsys.readouterr().err
    assert "1 unit(s)" in err and "train.max_steps: 2 -> 4" in err and "--retrain-changed" in err
    assert (folder / "summary.json").read_text() == summary  # refused: nothing touched
    assert study_main([*changed, "--retrain-changed"]) == 0
    assert "moved to" in capsys.readouterr().out
    assert load_config(folder / "config.yaml").train.max_steps == 4
    assert max(json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()) == 4
    (old,) = (out / "replaced").rglob("summary.json")
    assert old.read_text() == summary


def test_sizes_seeds_and_restrictions_shape_the_grid(tmp_path):
    """Each task at each size (folders TASK/SIZE/...), a slow model with fewer seeds and fewer tasks, a method on one
    model only; k3_sampled adds a rule to k3's runs instead of a unit of its own."""
    from dist_subspace.study.spec import plan_units, replica_dirs

    spec = StudySpec(
        tasks=["rotten_tomatoes", "snli"],
        models=["a", "b"],
        methods=["k1", "k3", "k3_sampled", "k3_beta0"],
        sizes={"n100": {"data.protocol": "stratified"}, "k16": {"data.shots_per_class": 16}},
        seeds=10,
        model_seeds={"b": 5},
        model_tasks={"b": ["snli"]},
        method_models={"k3_beta0": ["a"]},
        task_overrides={"snli@k16": {"data.dev_size": 48}},
    )
    units = plan_units(spec, {"a": "encoder", "b": "decoder"})
    assert len(units) == 2 * 2 * 3 + 1 * 2 * 2  # a: 2 tasks x 2 sizes x (k1, k3, k3_beta0); b: snli x 2 x (k1, k3)
    assert {u.method for u in units} == {"k1", "k3", "k3_beta0"}
    sizes = [u.size for u in units]  # every model and task at the first size before the next size
    assert sizes == sorted(sizes, key=list(spec.sizes).index) and [u.model for u in units[:7]] == ["a"] * 6 + ["b"]
    unit = Unit("snli", "b", "k3", 0.01, "k16")
    (run,) = run_overrides(spec, unit, tmp_path)
    assert run["simplex.replicas"] == 5 and run["eval.also_select_by"] == ["sampled:8"]
    assert run["data.shots_per_class"] == 16 and run["data.dev_size"] == 48
    assert unit.folder(tmp_path) == tmp_path / "snli" / "k16" / "b" / "k3" / "lr-0.01"
    assert len(replica_dirs(spec, unit, tmp_path)) == 5
    assert spec.task_labels() == ["rotten_tomatoes@n100", "rotten_tomatoes@k16", "snli@n100", "snli@k16"]
    limited = StudySpec(**{**asdict(spec), "size_models": {"k16": ["a"]}, "size_tasks": {"n100": ["snli"]}})
    assert {(u.model, u.task, u.size) for u in plan_units(limited, {"a": "encoder", "b": "decoder"})} == {
        ("a", "rotten_tomatoes", "k16"),
        ("a", "snli", "k16"),
        ("a", "snli", "n100"),
        ("b", "snli", "n100"),
    }
    with pytest.raises(ConfigError, match="size_tasks names 'n5'"):
        StudySpec(**{**asdict(spec), "size_tasks": {"n5": ["snli"]}})
    with pytest.raises(ConfigError, match="model_tasks names 'c'"):
        StudySpec(models=["a"], model_tasks={"c": ["rotten_tomatoes"]})


def _cells(methods: dict[str, list[float]], task="t", model="m", **extra) -> list[dict]:
    return [
        {"task": task, "model": model, "method": m, "lr": 0.01, "seed": s, "dev": 0.5, "test": v, **extra}
        for m, values in methods.items()
        for s, v in enumerate(values)
    ]


def test_a_cell_selected_at_its_last_evaluation_on_most_seeds_is_marked_not_converged():
    from dist_subspace.study.report import markdown, summarise

    spec = StudySpec(tasks=["t"], models=["m"], methods=["k1", "k3"], seeds=4)
    cells = _cells({"k1": [0.6, 0.7, 0.8, 0.7], "k3": [0.6, 0.7, 0.8, 0.7]}, last_eval_step=40, final_train_loss=0.2)
    for c, step in zip(cells, [40, 40, 40, 10, 40, 10, 10, 30], strict=True):
        c["selected_step"] = step  # k1: 3 of 4 at the last evaluation; k3: 1 of 4
    rows = summarise(spec, cells)["table"]["m"]
    assert rows["k1"]["t"]["at_last"] == 0.75 and not rows["k1"]["t"]["converged"]
    assert rows["k3"]["t"]["at_last"] == 0.25 and rows["k3"]["t"]["converged"]
    assert rows["k1"]["t"]["final_loss"] == pytest.approx(0.2)
    text = markdown(spec, summarise(spec, cells))
    assert "loss 0.200, last 75 % **not converged**" in text and "last 25 % |" in text


def test_the_questions_pair_seeds_per_task_and_correct_over_sizes(tmp_path):
    """Two sizes, two tasks, 3 seeds: k3 − k1 is +1 point on every pair at n100 and 0 at n500; the per-seed mean over
    tasks has a zero-width interval; Holm multiplies over the model's questions; the gain plot is drawn."""
    from dist_subspace.study.questions import answer, plot_gain_by_size
    from dist_subspace.study.report import method_scores

    spec = StudySpec(tasks=["t1", "t2"], models=["m"], methods=["k1", "k3"], seeds=3, sizes={"n100": {}, "n500": {}})
    cells = []
    for task in spec.task_labels():
        gain = 0.01 if task.endswith("n100") else 0.0
        cells += _cells({"k1": [0.5, 0.6, 0.7], "k3": [0.5 + gain, 0.6 + gain, 0.7 + gain]}, task=task)
    answers = answer(spec, method_scores(cells, spec))["m"]["simplex"]
    assert answers["n100"]["mean_diff"] == pytest.approx(0.01) and answers["n500"]["mean_diff"] == pytest.approx(0)
    assert answers["n100"]["by_seed"]["ci95"] == pytest.approx([0.01, 0.01])
    assert answers["all"]["mean_diff"] == pytest.approx(0.005) and answers["n100"]["p"] == pytest.approx(2 / 64)
    assert answers["n100"]["p_holm"] == pytest.approx(min(1, 3 * answers["n100"]["p"]))
    assert plot_gain_by_size(spec, {"m": {"simplex": answers}}, tmp_path / "gain.png")
    assert (tmp_path / "gain.png").read_bytes()[:4] == b"\x89PNG"


def test_a_spec_changed_after_results_is_listed_with_what_changed():
    from dist_subspace.study.report import spec_hash, spec_history

    old = StudySpec(tasks=["t"], models=["m"], seeds=5)
    new = StudySpec(tasks=["t"], models=["m"], seeds=10)
    previous = {"spec": asdict(old), "spec_hash": spec_hash(old), "cells": [{}]}
    (entry,) = spec_history(new, previous)
    assert entry["changed"] == {"seeds": [5, 10]} and entry["from"] == spec_hash(old) != entry["to"]
    assert spec_history(old, previous) == []  # unchanged
    assert spec_history(new, {**previous, "cells": []}) == []  # no results yet: a change is free


def test_the_pilot_extrapolates_a_unit_from_its_rates_and_sizes():
    """A k3 unit with the sampled rule and an ensemble test: 10 epochs of 32 examples at batch 8 are 40 steps, an
    evaluation each epoch scores dev at the centroid and 8 sampled points, test at 1 + 8 points under each rule."""
    from dist_subspace.study.pilot import test_points, unit_seconds

    spec = StudySpec(tasks=["t"], models=["m"], methods=["k1", "k3", "k3_sampled", "k3_sampled_ensemble"], seeds=10)
    spec.base = {"train.epochs": 10, "train.eval_every_epochs": 1, "train.micro_batch_size": 8}
    (run,) = run_overrides(spec, Unit("t", "m", "k3", 0.01), Path("/tmp/x"))
    cfg = load_config(None, as_overrides(run))
    assert test_points(cfg) == (1 + 8) * 2 + 1  # + the initial centroid (k3 scores it for `none`)
    timing = {"step": 4.0, "forward": 0.01, "startup": 40.0, "replicas": 10}
    cost = unit_seconds(cfg, (32, 32, 1000), timing)
    assert cost["steps"] == 40 and cost["evaluations"] == 10
    assert cost["train"] == pytest.approx(160.0) and cost["dev"] == pytest.approx(10 * 32 * 9 * 10 * 0.01)
    assert cost["test"] == pytest.approx(1000 * 19 * 10 * 0.01)
    assert cost["total"] == pytest.approx(40 + 160 + 288 + 1900)


def test_an_archive_brings_finished_units_back_to_a_machine_without_its_runs(small_assets, tmp_path, capsys):
    """--archive keeps each finished unit's summaries, metrics and configs (no weights); on a machine whose
    output_dir is gone, the same command takes them back and trains nothing, with the same table."""
    out, archive = tmp_path / "study", tmp_path / "archive"
    args = [*_small_study(tmp_path, small_assets, out, methods=("k1",)), "--archive", str(archive)]
    assert study_main(args) == 0
    table = _table(out)
    assert not list(archive.rglob("*.safetensors")) and list(archive.rglob("summary.json"))
    shutil.rmtree(out)
    capsys.readouterr()
    assert study_main(args) == 0
    printed = capsys.readouterr().out
    assert "1 finished unit(s) taken back" in printed and "training 0 unit(s)" in printed
    assert _table(out) == table


def test_a_study_takes_a_generation_task(small_assets, tmp_path):
    """BBC headlines on the small decoder: K = 1 against K = 3 at its centroid, by the sampled dev loss and as an
    ensemble decoded from its mixture; each selected by the lowest dev loss, tested by ROUGE-L."""
    model_dir, _ = small_assets
    out = tmp_path / "study"
    spec = {
        "output_dir": str(out),
        "tasks": ["bbc_headlines"],
        "models": [str(model_dir)],
        "methods": ["none", "k1", "k3", "k3_sampled", "k3_ensemble"],
        "seeds": 2,
        "lrs": [0.01],
        "ensemble": 2,
        "sampled": 2,
        "base": {
            "data.protocol": "first_n",
            "data.first_n": 8,
            "data.dev_size": 4,
            "data.test_size": 6,
            "train.max_steps": 2,
            "train.micro_batch_size": 4,
            "train.eval_every": 1,
            "eval.max_new_tokens": 4,
            "eval.landscape": False,
        },
    }
    path = tmp_path / "gen.yaml"
    path.write_text(json.dumps(spec))
    assert study_main([str(path)]) == 0
    record = json.loads((out / "study.json").read_text())
    rows = record["table"][str(model_dir)]
    assert set(rows) == {"none", "k1", "k3", "k3_sampled", "k3_ensemble"}
    assert all(rows[m]["bbc_headlines"]["n"] == 2 for m in rows)
    cells = {(c["method"], c["seed"]): c for c in record["cells"]}
    for seed in (0, 1):
        k3, sampled = cells[("k3", seed)], cells[("k3_sampled", seed)]
        assert k3["metric"] == "rougeL" and k3["select_metric"] == "loss" and 0 <= k3["test"] <= 1
        rows = [json.loads(line) for line in (Path(k3["folder"]) / "metrics.jsonl").read_text().splitlines()]
        dev = [r for r in rows if r["split"] == "dev" and r["mode"] == "sampled:2"]
        assert sampled["dev"] == min(r["loss"] for r in dev)  # the lowest sampled dev loss picked its step
        assert k3["test_final_ensemble"] is not None
