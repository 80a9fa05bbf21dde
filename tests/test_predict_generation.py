"""The commands that read a finished run, on a generation run (issue 25): ``predict`` answers prompts (a prompt
column, or chat records ending with the user's message) with each row's response, and for ``ensemble:S`` the
mixture's entropy and how many of its points answer otherwise, on 1 and 2 processes (ZeRO-3) alike; ``evaluate``
prints the loss and the generation metrics of the decoded split; every bad input is one line, exit 2."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dist_subspace import evaluate as evaluate_command
from dist_subspace import predict as predict_command
from tests.two_nodes import BIN, ROOT, free_port

pytestmark = pytest.mark.slow

# Prompts of different lengths (3 to 20 words), read as they are (the run's template is "{text}"): the small model
# continues each its own way, so its answers end at different steps once the end-of-sequence token is a word.
PROMPTS = [
    "Shares in the bank fell",
    "The government announced on Monday that it would raise taxes on fuel and tobacco next year",
    "A new film",
    "Scientists have found a way to store energy from the sun in a liquid that can be kept for years",
    "The team won",
    "Music sales rose sharply last year as more people bought songs online, according to a report from the industry",
    "Prices of oil climbed",
    "The minister said the plan would cut waiting times in hospitals across the country by half within two years",
    "Fans queued overnight",
]
MAX_NEW = 6


@pytest.fixture(scope="module")
def gen_run(small_assets, tmp_path_factory):
    """A short real generation run (2 steps) on bbc_headlines (first_n), prompts read as they are."""
    from dist_subspace.train import main

    model_dir, _ = small_assets
    out = tmp_path_factory.mktemp("generation") / "run"
    overrides = [
        f"model.name_or_path={model_dir}",
        "model.dtype=float32",
        "data.task=bbc_headlines",
        "data.protocol=first_n",
        "data.first_n=8",
        "data.dev_size=4",
        "data.test_size=6",
        'data.template="{text}"',
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "train.eval_every=2",
        "train.save_every=2",
        "train.warmup_steps=1",
        "train.progress=false",
        "eval.landscape=false",
        "eval.initial_test=false",
        f"eval.max_new_tokens={MAX_NEW}",
    ]
    assert main(overrides) == 0
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """The prompts as a CSV with a response column (ignored), and as JSON lines without it."""
    folder = tmp_path_factory.mktemp("prompts")
    pd.DataFrame({"prompt": PROMPTS, "response": ["a headline"] * len(PROMPTS)}).to_csv(folder / "p.csv", index=False)
    (folder / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"csv": folder / "p.csv", "jsonl": folder / "p.jsonl"}


def predict(*args) -> int:
    return predict_command.main([str(a) for a in args])


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def decoded(run_dir: Path, examples: list[dict], mode: str, alone: bool = False):
    """What decode_texts gives for ``examples`` in ``mode`` on the run, one query at a time: the mode's responses
    (an ensemble: its mixture's) and, with ``alone``, each ensemble point's own, each in a call of its own."""
    from dist_subspace.core.config import check_eval_mode
    from dist_subspace.evaluation.decoding import DecodeQuery, Decoding, decode_texts
    from dist_subspace.evaluation.points import mode_points
    from dist_subspace.training.reload import finished_run_config, load_finished_run

    run = load_finished_run(run_dir, finished_run_config(run_dir))
    try:
        points = mode_points(run.model, *check_eval_mode(mode), run.cfg.simplex.sampling)
        queries = [DecodeQuery(examples, points)] + ([DecodeQuery(examples, [p]) for p in points] if alone else [])
        decoding = Decoding(MAX_NEW)
        return [decode_texts(run.model, run.engine, [q], run.collator, decoding, 4)[0] for q in queries]
    finally:
        run.end()


def as_examples(texts: list[str]) -> list[dict]:
    return [{"text": t, "text_pair": None, "label": "", "id": i} for i, t in enumerate(texts)]


def test_centroid_responses_in_input_order_and_the_response_column_warns(gen_run, prompts, tmp_path, capsys):
    (want,) = decoded(gen_run, as_examples(PROMPTS), "centroid")
    assert len(set(want.texts)) > 1  # the prompts are answered differently, so row order shows
    out = tmp_path / "answers.jsonl"
    capsys.readouterr()
    assert predict(gen_run, "--data", prompts["csv"], "--out", out, "--chunk", 4) == 0
    rows = read_rows(out)
    assert [r["response"] for r in rows] == want.texts and set(rows[0]) == {"response"}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'response'" in warnings[0] and "generates the response" in warnings[0]
    assert predict(gen_run, "--data", prompts["jsonl"], "--max-new-tokens", 2) == 0  # stdout; no warning
    printed = capsys.readouterr()
    short = [json.loads(line)["response"] for line in printed.out.splitlines()]
    assert len(short) == len(PROMPTS) and not [line for line in printed.err.splitlines() if "warning" in line]
    assert all(w.startswith(s) for s, w in zip(short, want.texts, strict=True))  # greedy: the first 2 tokens


def test_ensemble_gives_the_mixtures_response_entropy_and_the_points_disagreement(gen_run, prompts, tmp_path):
    """One stacked call (the mixture's group beside each point's own) gives what separate calls give, whatever
    the chunk: the mixture's response and mean token entropy, and the share of the 3 points answering otherwise."""
    mixture, *alone = decoded(gen_run, as_examples(PROMPTS), "ensemble:3", alone=True)
    out, whole = tmp_path / "chunked.jsonl", tmp_path / "whole.parquet"
    assert predict(gen_run, "--data", prompts["csv"], "--out", out, "--mode", "ensemble:3", "--chunk", 4) == 0
    rows = read_rows(out)
    assert list(rows[0]) == ["response", "entropy", "disagreement"]
    assert [r["response"] for r in rows] == mixture.texts
    assert [r["entropy"] for r in rows] == pytest.approx(mixture.entropy, abs=1e-5)
    assert all(r["entropy"] > 0 for r in rows)
    share = [sum(a.texts[n] != text for a in alone) / 3 for n, text in enumerate(mixture.texts)]
    assert [r["disagreement"] for r in rows] == share
    assert predict(gen_run, "--data", prompts["csv"], "--out", whole, "--mode", "ensemble:3") == 0
    other = pd.read_parquet(whole)
    assert other["response"].tolist() == mixture.texts and other["disagreement"].tolist() == share


@pytest.fixture(scope="module")
def chat_run(gen_run, small_assets, tmp_path_factory):
    """A run folder built from the generation run's: the same simplex, its data a file of chat records
    (``data.messages_field``), each ending with the assistant's answer."""
    root = tmp_path_factory.mktemp("chat")
    shutil.copytree(gen_run, root / "run", ignore=shutil.ignore_patterns("checkpoints"))
    records = [[{"role": "user", "content": p}, {"role": "assistant", "content": "A headline"}] for p in PROMPTS]
    (root / "chats.jsonl").write_text("".join(json.dumps({"chat": r}) + "\n" for r in records))
    config = yaml.safe_load((root / "run" / "config.yaml").read_text())
    config["data"].update(task=str(root / "chats.jsonl"), messages_field="chat", first_n=4, dev_size=2, test_size=2)
    config["data"]["template"] = None
    (root / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "run"


def test_chat_records_are_answered_through_the_chat_template(chat_run, tmp_path, capsys):
    """A prompt-only chat record (the user's message last) is answered after the template's assistant turn; a record
    that goes on with the assistant's answer is answered the same (its answer ignored, one warning)."""
    from dist_subspace.data.batching import Collator

    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    answered = [{"role": "user", "content": PROMPTS[4]}, {"role": "assistant", "content": "Team wins"}]
    data, out = tmp_path / "chats.jsonl", tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps({"chat": c}) + "\n" for c in [*chats, answered]))
    capsys.readouterr()
    assert predict(chat_run, "--data", data, "--out", out) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 chat record(s)" in warnings[0]
    examples = [{"text": "", "text_pair": None, "messages": c, "label": "", "id": i} for i, c in enumerate(chats)]
    examples.append({**examples[0], "messages": answered[:1], "id": 4})
    (want,) = decoded(chat_run, examples, "centroid")
    assert [r["response"] for r in read_rows(out)] == want.texts
    from transformers import AutoTokenizer

    cfg = yaml.safe_load((chat_run / "config.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"]["name_or_path"])
    prompt = Collator(tokenizer, predict_command.TASKS["bbc_headlines"], True).prompt(examples[0])
    assert prompt.endswith("<|im_start|>assistant\n") and PROMPTS[0] in prompt  # the turn the response fills


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("case", "args", "expect"),
    [
        ("no_prompt", [], "no column 'prompt' (the run's data.prompt_field); columns present: ['text']"),
        ("beams", ["--mode", "ensemble:3", "--num-beams", "2"], "--num-beams 2: an ensemble decodes from the mixture"),
        ("tokens", ["--max-new-tokens", "0"], "--max-new-tokens and --num-beams must be >= 1 (got 0, 1)"),
        ("bad_chat", [], "row 1 of column 'chat' is not a chat record ending with the user's message"),
    ],
)
def test_bad_generation_inputs_are_one_line_exit_2_before_the_model_loads(
    gen_run, chat_run, prompts, tmp_path, capsys, monkeypatch, case, args, expect
):
    from dist_subspace.training.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Engine, "load_backbone", refuse)
    run, data, out = gen_run, prompts["csv"], tmp_path / "out" / "answers.csv"
    out.parent.mkdir()
    if case == "no_prompt":
        data = tmp_path / "texts.csv"
        data.write_text("text\nthe film was great\n")
    elif case == "bad_chat":
        run, data = chat_run, tmp_path / "chats.jsonl"
        lines = [[{"role": "user", "content": "hello"}], [{"role": "system", "content": "be brief"}]]
        data.write_text("".join(json.dumps({"chat": c}) + "\n" for c in lines))
    capsys.readouterr()
    assert predict(run, "--data", data, "--out", out, *args) == 2
    assert expect in _one_line_error(capsys)
    assert list(out.parent.iterdir()) == []


def test_evaluate_prints_the_loss_and_the_generation_metrics_of_the_split(gen_run, tmp_path, capsys, monkeypatch):
    """As the run scored its test split at the end (the same decoding, the run's eval keys), and for an ensemble
    the mixture's texts and entropy but no loss; --plot is refused in one line before the model loads."""
    test_row = [r for r in read_rows(gen_run / "metrics.jsonl") if r["split"] == "test"][-1]
    capsys.readouterr()
    assert evaluate_command.main([str(gen_run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metric"] == "rougeL" and result["value"] == result["rougeL"] and result["n"] == 6
    for key in ("loss", "perplexity", "bleu", "chrf", "rougeL", "exact_match"):
        assert result[key] == pytest.approx(test_row[key], abs=1e-6), key
    assert "nll" not in result and "ece" not in result  # calibration is for classes
    assert evaluate_command.main([str(gen_run), "--mode", "ensemble:2", "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "loss" not in result and result["entropy"] > 0 and 0 <= result["chrf"] <= 1
    assert evaluate_command.main([str(gen_run), "--split", "dev", "--num-beams", "2", "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # beam search at the centroid
    assert result["split"] == "dev" and result["n"] == 4 and result["loss"] > 0 and 0 <= result["rougeL"] <= 1
    from dist_subspace.training.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Engine, "load_backbone", refuse)
    assert evaluate_command.main([str(gen_run), "--plot", str(tmp_path / "r.png")]) == 2
    assert _one_line_error(capsys) == "error: --plot: bbc_headlines generates text; a reliability diagram needs classes"


# ---- 2 processes, ZeRO-3 -------------------------------------------------------------------------------------------
def _ending_token(rows: list[list[int]]) -> int:
    """A token of these greedy answers that ends them at the most different steps once it is the end-of-sequence
    token, while at least one of them never meets it (and runs to MAX_NEW tokens)."""
    firsts = {}
    for token in {t for row in rows for t in row}:
        steps = [row.index(token) for row in rows if token in row]
        if len(steps) < len(rows):
            firsts[token] = len(set(steps))
    return max(sorted(firsts), key=firsts.get)


@pytest.fixture(scope="module")
def ending_runs(gen_run, small_assets, tmp_path_factory):
    """The generation run with a word as its end-of-sequence token (a copy of the model folder with that token in
    tokenizer_config.json, the simplex as trained): one folder as trained, one with engine.deepspeed=zero3_bf16.
    Returns the two folders and the centroid's answers, each cut where it meets that token."""
    root = tmp_path_factory.mktemp("ending")
    (centroid,) = decoded(gen_run, as_examples(PROMPTS), "centroid")
    token = _ending_token(centroid.token_ids)
    model = root / "model"
    shutil.copytree(small_assets[0], model, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(small_assets[0] / "model.safetensors", model / "model.safetensors")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = tokenizer.convert_ids_to_tokens(token)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    cut = [row[: row.index(token)] if token in row else row for row in centroid.token_ids]
    folders = {}
    for name, engine in (("plain", None), ("zero3", "zero3_bf16")):
        shutil.copytree(gen_run, root / name, ignore=shutil.ignore_patterns("checkpoints"))
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        config["model"]["name_or_path"] = str(model)
        config["engine"].update(deepspeed=engine, collective_timeout_s=120)  # a hang fails in 2 minutes
        (root / name / "config.yaml").write_text(yaml.safe_dump(config))
        folders[name] = root / name
    return folders, cut, [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in cut]


# One launch, both modes: predict's pass (Inputs, label_all) twice over one loaded run (a second process group in the
# same torchrun processes cannot connect, and a launch costs ~25 s here).
LAUNCHED = """import gc
import sys
from argparse import Namespace
from pathlib import Path

from dist_subspace.evaluation.decoding import Decoding
from dist_subspace.predict import Inputs, label_all
from dist_subspace.training.reload import finished_run_config, load_finished_run

run_dir, data, out = map(Path, sys.argv[1:4])
run = load_finished_run(run_dir, finished_run_config(run_dir))
try:
    for mode, chunk, batch in MODES:
        inputs = Inputs(data, "prompt", None, "response", chunk)
        args = Namespace(mode=mode, batch_size=batch, out=out / f"{mode}.jsonl", decoding=Decoding(MAX_NEW))
        label_all(run, inputs, inputs.count(), args)
finally:
    run.end()
# The ZeRO-3 parameters keep gloo's process group alive after destroy_process_group(); freed at interpreter
# teardown, its threads were once seen to abort a rank after its work was done ("terminate called without an
# active exception", pytorch/pytorch#179291): free them while the interpreter is whole.
del run
gc.collect()
"""
# centroid: one chunk, 2 rows a batch (5 and 4 groups: 3 and 2 batches, the second rank's padded); ensemble:3: chunks
# of 5 and 4, one batch a rank (groups of 3 rows, the mixture's, beside 1-row groups, each point's own)
MODES = (("centroid", 9, 2), ("ensemble:3", 5, 64))


@pytest.mark.distributed
def test_two_processes_under_zero3_answer_as_one_process(ending_runs, prompts, tmp_path):
    """9 prompts of 3 to 20 words whose answers end at different steps (some run to the last new token), centroid
    and ensemble:3 (its 3 points decoded beside the mixture), under ZeRO-3: every process runs as many forwards (no
    hang), each row comes out once, in order, with the texts, entropies and disagreements of one process."""
    folders, cut, texts = ending_runs
    steps = {len(ids) for ids in cut}
    assert MAX_NEW in steps and len(steps - {MAX_NEW}) >= 2, cut  # ended at 2+ different steps, and some ran out
    script, two = tmp_path / "launched.py", tmp_path / "two"
    script.write_text(f"MAX_NEW, MODES = {MAX_NEW}, {MODES!r}\n{LAUNCHED}")
    two.mkdir()
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*torchrun, str(script), str(folders["zero3"]), str(prompts["csv"]), str(two)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for mode, chunk, batch in MODES:
        one = tmp_path / f"one-{mode}.jsonl"
        args = ["--data", prompts["csv"], "--out", one, "--mode", mode, "--chunk", chunk, "--batch-size", batch]
        assert predict(folders["plain"], *args) == 0
        solo, duo = read_rows(one), read_rows(two / f"{mode}.jsonl")
        assert len(duo) == len(PROMPTS)  # each prompt once
        assert [r["response"] for r in duo] == [r["response"] for r in solo]
        if mode == "centroid":
            assert [r["response"] for r in solo] == texts  # cut at the new end-of-sequence token
        else:
            assert [r["disagreement"] for r in duo] == [r["disagreement"] for r in solo]
            assert [r["entropy"] for r in duo] == pytest.approx([r["entropy"] for r in solo], abs=1e-4)
