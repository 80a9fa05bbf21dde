"""The trainer on generation tasks (issue 25): a short real run on bbc_headlines (its test decoded and scored, dev
scored by the loss per response token and selected by it), selection by a decoded dev metric, and the bad inputs a
generation run refuses in one line before the frozen model loads (exit status 2, nothing written).

The generation core itself (collator, loss against PEFT, decoding): tests/test_generation.py.
"""

import json
import math

import pytest

from dist_subspace.train import main
from dist_subspace.training.engine import Engine
from tests.conftest import run_args

pytestmark = pytest.mark.slow
TEXT_METRICS = ("bleu", "chrf", "rougeL", "exact_match")


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _first_best(rows: list[dict], key: str, lowest: bool) -> dict:
    """The row the trainer selects: the best ``key``, the earliest on ties (a later step must be strictly better)."""
    best = min(r[key] for r in rows) if lowest else max(r[key] for r in rows)
    return next(r for r in rows if r[key] == best)


def test_bbc_headlines_trains_decodes_test_and_selects_the_lowest_dev_loss(small_assets, tmp_path):
    """K = 3 on the small 4-layer SmolLM2, the first 8 shuffled articles, eval.also_select_by=[sampled:2]."""
    model_dir, data = small_assets
    out = tmp_path / "run"
    args = [
        *("data.task=bbc_headlines", "data.protocol=first_n", "data.first_n=8", "data.dev_size=4", "data.test_size=6"),
        *("train.max_steps=4", "train.eval_every=2", "train.save_every=4", "train.micro_batch_size=2"),
        *("train.warmup_steps=0", "train.lr=0.05", "model.max_length=128", "prefix.length=4"),
        *("eval.landscape=false", "eval.also_select_by=[sampled:2]", "eval.max_new_tokens=6"),
    ]
    assert main(run_args(model_dir, data, out, *args)) == 0
    rows, summary = _rows(out), json.loads((out / "summary.json").read_text())

    tests = [r for r in rows if r["split"] == "test"]
    assert [r["step"] for r in tests] == [0, 4] and all(r["mode"] == "centroid" and r["n"] == 6 for r in tests)
    for r in tests:  # decoded and scored against the headlines, beside the teacher-forced loss
        assert all(0 <= r[m] <= 1 for m in TEXT_METRICS) and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert summary["metric"] == "rougeL" and summary["select_metric"] == "loss"
    card = (out / "final" / "README.md").read_text()  # the card's test table holds the selected simplex's scores
    assert f"{tests[-1]['rougeL']:.4f}" in card and f"{tests[-1]['chrf']:.4f}" in card
    assert summary["test_initial"] == tests[0]["rougeL"] and summary["test_final"] == tests[-1]["rougeL"]
    assert 0 <= summary["test_final@sampled:2"] <= 1

    dev = {mode: [r for r in rows if r["split"] == "dev" and r["mode"] == mode] for mode in ("centroid", "sampled:2")}
    for scored in dev.values():
        assert [r["step"] for r in scored] == [2, 4] and all(r["n"] == 4 for r in scored)
        assert not any(set(TEXT_METRICS) & set(r) for r in scored)  # dev is not decoded: it is selected by its loss
        assert len({r["loss"] for r in scored}) == 2  # the loss moved: the selection has something to pick
    assert all(r["perplexity"] == pytest.approx(math.exp(r["loss"])) for r in dev["centroid"])
    for r in dev["sampled:2"]:  # over the 2 draws: each score's mean and SD (the mean perplexity >= exp(mean loss))
        assert r["loss_std"] > 0 and r["perplexity"] >= math.exp(r["loss"]) * (1 - 1e-9)
    best = _first_best(dev["centroid"], "loss", lowest=True)
    assert summary["selected_step"] == best["step"]
    sampled = _first_best(dev["sampled:2"], "loss", lowest=True)
    assert summary["selected_step@sampled:2"] == sampled["step"] and summary["dev@sampled:2"] == sampled["loss"]
    final = json.loads((out / "final" / "simplex_config.json").read_text())
    assert final["dev_score"] == best["loss"] and final["selected_step"] == best["step"]
    assert (out / "final" / "peft_centroid" / "adapter_model.safetensors").is_file()
    assert (out / "final_by" / "sampled-2" / "simplex.safetensors").is_file()


def _copy_task(path, n: int = 40):
    """Prompts of four words and the first of them as the response: a task the real SmolLM2-135M learns in steps."""
    import random

    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "green", "table", "music", "horse", "paper", "light"]
    with open(path, "w") as f:
        for _ in range(n):
            chosen = rng.sample(words, 4)
            f.write(json.dumps({"prompt": f"Words: {' '.join(chosen)}\nFirst word:", "response": f" {chosen[0]}"}))
            f.write("\n")
    return path


def test_select_metric_rougeL_decodes_dev_at_every_evaluation_and_selects_the_highest(tmp_path):
    """The real SmolLM2-135M on a user's prompt/response file: dev decoded at each of 4 evaluations, its rougeL rising
    from 0.25; the selected step is the first with the highest rougeL, and final/ keeps that rougeL as its score."""
    out, data = tmp_path / "run", _copy_task(tmp_path / "copy.jsonl")
    args = [
        "data.response_field=response",
        *("data.protocol=first_n", "data.first_n=8", "data.dev_size=4", "data.test_size=2", "eval.initial_test=false"),
        *("train.max_steps=4", "train.eval_every=1", "train.save_every=4", "train.micro_batch_size=2"),
        *("train.lr=0.05", "prefix.length=4", "eval.select_metric=rougeL", "eval.max_new_tokens=3"),
    ]
    assert main(run_args("smollm2-135m", data, out, "train.warmup_steps=0", "eval.landscape=false", *args)) == 0
    rows, summary = _rows(out), json.loads((out / "summary.json").read_text())
    dev = [r for r in rows if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [1, 2, 3, 4] and all(set(TEXT_METRICS) <= set(r) for r in dev)
    assert len({r["rougeL"] for r in dev}) > 1 and dev[0]["rougeL"] < max(r["rougeL"] for r in dev)
    best = _first_best(dev, "rougeL", lowest=False)
    assert summary["select_metric"] == "rougeL" and summary["selected_step"] == best["step"]
    final = json.loads((out / "final" / "simplex_config.json").read_text())
    assert final["dev_score"] == best["rougeL"]


# ---- bad inputs --------------------------------------------------------------------------------------------------
def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _model_copy(model_dir, folder, edit, template: bool = True) -> str:
    """The small model's folder, its files linked, with ``edit`` applied to its tokenizer_config.json (and without its
    chat template unless ``template``)."""
    folder.mkdir()
    for file in model_dir.iterdir():
        if file.name != "tokenizer_config.json" and (template or file.name != "chat_template.jinja"):
            (folder / file.name).symlink_to(file)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    edit(config)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


PAIRS = [{"prompt": f"Say {i}.", "response": f" number {i}"} for i in range(30)]
CHATS = [[{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"number {i}"}] for i in range(30)]
GENERATE = ("data.protocol=first_n", "data.first_n=8", "data.dev_size=4", "data.test_size=4")


def _missing_column(tmp, model_dir):
    file = _jsonl(tmp / "pairs.jsonl", [{"prompt": r["prompt"], "answer": r["response"]} for r in PAIRS])
    return [f"data.task={file}", "data.response_field=response"]


def _empty_response(tmp, model_dir):
    file = _jsonl(tmp / "pairs.jsonl", [*PAIRS[:5], {"prompt": "Say 5.", "response": "  "}, *PAIRS[6:]])
    return [f"data.task={file}", "data.response_field=response"]


def _no_template(tmp, model_dir):
    model = _model_copy(model_dir, tmp / "no-template", lambda c: c.pop("chat_template", None), template=False)
    file = _jsonl(tmp / "chats.jsonl", [{"messages": m} for m in CHATS])
    return [f"model.name_or_path={model}", f"data.task={file}", "data.messages_field=messages"]


def _not_a_chat(tmp, model_dir):
    file = _jsonl(tmp / "chats.jsonl", [{"messages": m} for m in CHATS[:3]] + [{"messages": CHATS[3][:1]}])
    return [f"data.task={file}", "data.messages_field=messages"]


def _no_eos(tmp, model_dir):
    model = _model_copy(model_dir, tmp / "no-eos", lambda c: c.update(eos_token=None))
    return [f"model.name_or_path={model}", "data.task=bbc_headlines"]


def _long_response(tmp, model_dir):
    file = _jsonl(tmp / "pairs.jsonl", [{"prompt": "Say it.", "response": " word" * 300}] * 30)
    return [f"data.task={file}", "data.response_field=response", "model.max_length=64"]


BAD_INPUTS = {
    "a missing response column": (
        _missing_column,
        "pairs.jsonl: no column 'response'; columns present: ['prompt', 'answer']; set data.response_field to one",
    ),
    "an empty response": (_empty_response, "pairs.jsonl: row 5 has an empty 'response'; fill or remove such rows"),
    "a chat record without the template it needs": (
        _no_template,
        "chat records (data.messages_field) need a tokenizer with a chat template, and this one has none",
    ),
    "a chat record that does not end with the assistant's answer": (
        _not_a_chat,
        "chats.jsonl: row 3 is not a chat record ending with the assistant's answer",
    ),
    "a tokenizer without an end-of-sequence token": (
        _no_eos,
        "task bbc_headlines: the tokenizer has no end-of-sequence token, which ends each response",
    ),
    "a response longer than model.max_length": (
        _long_response,
        "its response is 301 tokens (with the end-of-sequence token), model.max_length is 64; raise model.max_length",
    ),
    "a generation task on an encoder": (
        lambda tmp, m: ["model.name_or_path=minilm-l6", "data.task=bbc_headlines"],
        "task bbc_headlines generates text: use a decoder (model.name_or_path=smollm2-135m, ...)",
    ),
    "data.protocol=kshot on a generation task": (
        lambda tmp, m: ["data.task=bbc_headlines", "data.protocol=kshot"],
        "a response has no class to draw per class or stratify by; use data.protocol=first_n data.first_n=N",
    ),
    "eval.select_metric on a classification task": (
        lambda tmp, m: ["eval.select_metric=rougeL", "data.protocol=kshot"],
        "reviews.jsonl is selected by its metric, accuracy: drop eval.select_metric",
    ),
    "an ensemble selection rule by a generation task's dev loss": (
        lambda tmp, m: ["data.task=bbc_headlines", "eval.also_select_by=[ensemble:2]"],
        "eval.also_select_by=ensemble:2: an ensemble of a generation task decodes from the mixture of its points",
    ),
    "beam search on an ensemble": (
        lambda tmp, m: ["data.task=bbc_headlines", "eval.extra_test_modes=[ensemble:4]", "eval.num_beams=2"],
        "eval.num_beams=2: beam search decodes one point at a time, and ensemble:4 is a mixture of points",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_generation_input_is_refused_in_one_line_before_the_model_loads(
    case, small_assets, tmp_path, monkeypatch, capsys
):
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Engine, "load_backbone", refuse)
    model_dir, data = small_assets
    make, message = BAD_INPUTS[case]
    out = tmp_path / "run"
    extra = make(tmp_path, model_dir)
    capsys.readouterr()
    assert main(run_args(model_dir, data, out, "eval.landscape=false", *GENERATE, *extra)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err[-2000:]
    assert not out.exists()  # nothing written


def test_a_run_grouped_by_length_trains_on_the_grouped_order_and_pads_less(small_assets, tmp_path):
    """train.group_by_length=4: the examples each step trains on (its trace) are the grouped order's, computed from
    the collator's own lengths, and its micro-batches hold fewer padded tokens than the plain order's."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from dist_subspace.data.batching import Collator
    from dist_subspace.data.sources import load_splits
    from dist_subspace.training.schedule import grouped_step_examples, step_examples

    model_dir, data = small_assets
    out = tmp_path / "run"
    args = [
        *("data.task=bbc_headlines", "data.protocol=first_n", "data.first_n=16", "data.dev_size=4", "data.test_size=4"),
        *("train.max_steps=4", "train.eval_every=4", "train.save_every=4", "train.micro_batch_size=2"),
        *("train.grad_accum=2", "train.group_by_length=4", "train.trace=true", "model.max_length=256"),
        *("prefix.length=4", "eval.landscape=false", "eval.max_new_tokens=4"),
    ]
    assert main(run_args(model_dir, data, out, *args)) == 0
    splits = load_splits("bbc_headlines", "first_n", first_n=16, dev_size=4, test_size=4)
    collator = Collator(AutoTokenizer.from_pretrained(model_dir), splits.task, True, 256)
    lengths = tuple(len(collator.encode(e)["input_ids"]) for e in splits.train)
    trace = load_file(str(out / "ranks" / "trace-rank-0.safetensors"))
    grouped, plain = [], []
    for step in range(4):
        ran = [trace[f"step{step}.micro{m}.index"].tolist() for m in range(2)]
        assert ran[0] + ran[1] == grouped_step_examples(lengths, 0, step, 4, 4)
        grouped += ran
        order = step_examples(16, 0, step, 4)
        plain += [order[:2], order[2:]]
    assert sorted(e for b in grouped for e in b) == sorted(e for b in plain for e in b)  # one epoch, whole
    width = lambda batches: sum(len(b) * max(lengths[e] for e in b) for b in batches)  # noqa: E731
    assert width(grouped) < width(plain)
