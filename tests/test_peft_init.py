"""PEFT in: a prefix-tuning adapter trained with PEFT starts a simplex (``prefix.init=peft:PATH``)."""

import json

import pytest
import torch

from dist_subspace.core import simplex
from dist_subspace.train import main
from dist_subspace.training.engine import Engine
from tests.conftest import run_args

pytestmark = pytest.mark.slow
P = 8
OURS = "4 layers x 3 key/value heads x head width 64"  # the small SmolLM2's L, H_kv, D: a prefix (P, 1536)

# Adapters PEFT made on other models (the small SmolLM2's config with these changes): what the adapter is for,
# and what differs. The last has this model's total width, (8, 4 * 2 * 6 * 32) = (8, 1536), with another split.
OTHER_MODELS = {
    "another number of layers": (
        {"num_hidden_layers": 2},
        "2 layers x 3 key/value heads x head width 64",
        "a different number of layers",
    ),
    "another number of heads": (
        {"num_key_value_heads": 1},
        "4 layers x 1 key/value heads x head width 64",
        "a different number of key/value heads",
    ),
    "another head width": (
        {"head_dim": 32},
        "4 layers x 3 key/value heads x head width 32",
        "a different head width",
    ),
    "another base model of the same total width": (
        {"num_attention_heads": 6, "num_key_value_heads": 6, "head_dim": 32},
        "4 layers x 6 key/value heads x head width 32",
        "a different number of key/value heads and head width",
    ),
}


@pytest.fixture(scope="module")
def adapter(small_assets, tmp_path_factory):
    """A real PEFT prefix-tuning adapter: 3 AdamW steps of PEFT's own training on real labelled reviews, saved by
    PEFT (safetensors)."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = small_assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    rows = [json.loads(line) for line in data.read_text().splitlines()[:8]]
    batch = tokenizer(
        [f"Review: {r['text']}\nSentiment: {r['label']}" for r in rows], return_tensors="pt", padding=True
    )
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(folder)
    assert (folder / "adapter_model.safetensors").is_file()
    return folder


def _peft_accuracy(model_dir, adapter, examples, task) -> float:
    """PEFT's own forward with the adapter, as documented: right padding, logits at the last real token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_subspace.data.batching import Collator, label_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    batch = Collator(tokenizer, task, decoder=True)(list(enumerate(examples)))
    words = label_token_ids(tokenizer, task.label_words)
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(-1) - 1
    predicted = logits[torch.arange(len(last)), last][:, words].argmax(-1)
    return (predicted == batch["labels"]).float().mean().item()


def test_k1_from_a_peft_adapter_scores_exactly_as_peft_does(small_assets, adapter, tmp_path):
    from dist_subspace.data.sources import load_splits

    model_dir, data = small_assets
    out = tmp_path / "run"
    args = ["simplex.vertices=1", f"prefix.length={P}", f"prefix.init=peft:{adapter}", "eval.landscape=false"]
    assert main(run_args(model_dir, data, out, *args, "train.max_steps=2", "train.eval_every=2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    splits = load_splits(str(data), shots_per_class=8, test_size=41)  # run_args' data: the run's test set
    assert [e["id"] for e in splits.test] == json.loads((out / "examples.json").read_text())["test"]["ids"]
    assert summary["test_initial"] * 41 == pytest.approx(
        _peft_accuracy(model_dir, adapter, splits.test, splits.task) * 41
    )


def test_k1_from_a_peft_adapter_gives_peft_s_own_logits(small_assets, adapter):
    """The project's K = 1 model started from the adapter (as training starts it) against PEFT's PeftModel on the
    same right-padded batch: the class logits ``[B, C]`` are PEFT's at the last real token, over the label words."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_subspace.core.config import load_config
    from dist_subspace.core.model import PrefixSubspaceModel
    from dist_subspace.data.batching import Collator, label_token_ids
    from dist_subspace.data.sources import load_splits
    from dist_subspace.training.assembly import start_vertices

    model_dir, data = small_assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = load_splits(str(data), shots_per_class=8, test_size=41)
    words = label_token_ids(tokenizer, splits.task.label_words)
    batch = Collator(tokenizer, splits.task, decoder=True)(list(enumerate(splits.test[:12])))
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    backbone = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PrefixSubspaceModel(backbone, 1, P, label_token_ids=words).eval()
    cfg = load_config(None, ["simplex.vertices=1", f"prefix.length={P}", f"prefix.init=peft:{adapter}"])
    with torch.no_grad():
        model.simplex.vertices.copy_(start_vertices(cfg, model, 0, tokenizer.all_special_ids, len(tokenizer)))
        ours = model(batch["input_ids"], batch["attention_mask"], simplex.centroid_alpha(1))  # [B, C]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        full = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, S, V]
    last = batch["attention_mask"].sum(-1) - 1
    theirs = full[torch.arange(len(last)), last][:, words]  # [B, C]
    assert ours.shape == theirs.shape == (12, 2)
    torch.testing.assert_close(ours, theirs)


def test_every_vertex_starts_at_the_adapter_plus_the_usual_spread(small_assets, adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_subspace.core.config import ConfigError, load_config
    from dist_subspace.core.export import load_peft_prefix
    from dist_subspace.core.initialise import initial_vertices
    from dist_subspace.core.model import PrefixSubspaceModel
    from dist_subspace.training.assembly import start_vertices

    model_dir, _ = small_assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PrefixSubspaceModel(AutoModelForCausalLM.from_pretrained(model_dir), 3, P, label_token_ids=[5, 6])
    cfg = load_config(None, [f"prefix.length={P}", f"prefix.init=peft:{adapter}"])
    start = start_vertices(cfg, model, 0, tokenizer.all_special_ids, len(tokenizer))
    prefix = load_peft_prefix(adapter, model.geometry, P)  # [L, 2, H_kv, P, D]
    torch.testing.assert_close(start.mean(0), prefix, atol=1e-5, rtol=1e-5)  # the centroid starts at the adapter
    draws = initial_vertices(
        model, "activations", 0, exclude_token_ids=tokenizer.all_special_ids, vocab_size=len(tokenizer)
    )
    torch.testing.assert_close(start - prefix, draws - draws.mean(0), atol=1e-5, rtol=1e-5)  # the usual spread
    alpha = simplex.expand_alpha(simplex.centroid_alpha(3), 1, model.geometry.num_layers)
    torch.testing.assert_close(simplex.mix_prefix(start, alpha)[0], prefix, atol=1e-5, rtol=1e-5)
    small = PrefixSubspaceModel(AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=2), 1, P, [5])
    with pytest.raises(ConfigError) as refused:  # another model
        start_vertices(cfg, small, 0, tokenizer.all_special_ids, len(tokenizer))
    assert f"made for {model_dir} ({OURS}), this model has 2 layers x 3 key/value heads x head width 64: a " in str(
        refused.value
    )


@pytest.mark.parametrize(
    "case", ["another P", "a LoRA adapter", "a pickled adapter", "no folder", "a prefix its config does not describe"]
)
def test_an_adapter_that_does_not_fit_is_one_line_before_the_model_loads(
    small_assets, adapter, tmp_path, case, capsys, monkeypatch
):
    import shutil

    model_dir, data = small_assets
    folder, extra = tmp_path / "adapter", [f"prefix.length={P}"]
    shutil.copytree(adapter, folder)
    if case == "another P":
        extra = ["prefix.length=4"]
        message = "the adapter's prefix is 8 tokens (num_virtual_tokens=8), prefix.length is 4; set prefix.length=8"
    elif case == "a LoRA adapter":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
        message = "a LORA adapter, not PREFIX_TUNING"
    elif case == "a pickled adapter":
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
        message = "adapter_model.bin is a pickle"
    elif case == "no folder":
        folder = tmp_path / "nowhere"
        message = "no adapter_model.safetensors there"
    else:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 2}))
        message = (
            "adapter_model.safetensors holds a prefix of (8, 1536), adapter_config.json says 2 layers x 3 key/value "
            "heads x head width 64, which is (8, 768); save the adapter again with PEFT's save_pretrained"
        )
    out = tmp_path / "run"

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Engine, "load_backbone", refuse)
    assert main(run_args(model_dir, data, out, "simplex.vertices=1", f"prefix.init=peft:{folder}", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: prefix.init=peft:") and message in err[0], err


def _adapter_for_another_model(model_dir, root, changes: dict):
    """(base model folder, adapter folder): a small random Llama, the small SmolLM2's config with ``changes`` (and a
    64-token vocabulary), saved, and the untrained prefix-tuning adapter PEFT makes on it and saves (PEFT records
    the base model's folder in base_model_name_or_path, and its L, H_kv, H_kv * D as num_layers,
    num_attention_heads, token_dim)."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, vocab_size=64, intermediate_size=64, **changes)
    base, folder = root / "another-model", root / "adapter"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft_config).save_pretrained(folder)
    return base, folder


@pytest.mark.parametrize("case", list(OTHER_MODELS))
def test_an_adapter_made_for_another_model_is_one_line_naming_it_before_the_model_loads(
    small_assets, tmp_path, case, capsys, monkeypatch
):
    """L, H_kv and D are compared one by one, not only the total width L * 2 * H_kv * D, both by the import itself
    (load_peft_prefix) and before the backbone loads; the message names the adapter's base model."""
    from dist_subspace.core.arch import PrefixGeometry
    from dist_subspace.core.export import load_peft_prefix

    changes, theirs, what = OTHER_MODELS[case]
    model_dir, data = small_assets
    base, folder = _adapter_for_another_model(model_dir, tmp_path, changes)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    message = (
        f"prefix.init=peft:{folder}: the adapter was made for {base} ({theirs}), this model has {OURS}: {what}; "
        f"use a prefix-tuning adapter trained on this model, or set model.name_or_path={base}"
    )
    with pytest.raises(ValueError) as refused:
        load_peft_prefix(folder, PrefixGeometry(4, 3, 64), P)
    assert str(refused.value) == message

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Engine, "load_backbone", refuse)
    capsys.readouterr()  # the saves' progress bars
    args = ["simplex.vertices=1", f"prefix.length={P}", f"prefix.init=peft:{folder}"]
    assert main(run_args(model_dir, data, tmp_path / "run", *args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"], err
