"""Faults and bad inputs, tried: a save killed at every stage, a NaN, a full disk, retention, a killed rank, a hung
rank, and the catalogue of inputs a new user gets wrong. docs/reliability.md lists each case with its test here.

Faults are real where they can be: a forked process that dies by ``os._exit`` inside a save, a kernel write limit
(RLIMIT_FSIZE) for a full disk, ``kill -9`` of a rank, a rank that stops answering. A non-finite loss is injected.
"""

import hashlib
import itertools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import tokenize
from contextlib import contextmanager, suppress
from io import StringIO
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.data.batching import Collator, truncation_report
from dist_subspace.data.tasks import TASKS
from dist_subspace.evaluate import main as evaluate_main
from dist_subspace.train import main
from dist_subspace.training import checkpoint, finish, recipe
from dist_subspace.training.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    recover_interrupted_saves,
    save_checkpoint,
    save_final,
    simplex_tensors,
    verify_folder,
)
from dist_subspace.training.engine import Engine
from dist_subspace.training.settings import auto_dtype, check_ds_config, compute_dtype, cpu_flags
from tests.conftest import run_args, tiny_backbone
from tests.two_nodes import BIN, ROOT, free_port

NO_BEST = {"centroid": {"scores": [None], "steps": [None], "tensors": None}}
QUICK = ("eval.landscape=false",)


# ---- helpers -------------------------------------------------------------------------------------
def _tiny_state(seed: int = 0):
    """A tiny Llama with a K=2 simplex, its AdamW and scheduler: enough to write real checkpoints."""
    model = PrefixSubspaceModel(tiny_backbone("llama"), 2, 3, label_token_ids=[5, 6])
    torch.manual_seed(seed)
    model.simplex.vertices.data.normal_()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler) -> None:
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    loss = model(ids, torch.ones_like(ids), torch.full((2,), 0.5)).logsumexp(-1).mean() + model.regulariser()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes: to prove nothing was written or overwritten."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _one_error_line(capsys, message: str) -> str:
    err = capsys.readouterr().err
    lines = _error_lines(err)
    if os.environ.get("SHOW_ERRORS"):
        sys.__stdout__.write("\n>> " + " | ".join(lines) + "\n")
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err[-3000:]
    return lines[0]


@contextmanager
def _file_size_limit(limit: int):
    """The kernel refuses writes past ``limit`` bytes (EFBIG), as a full disk refuses them (ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


class _Killed(BaseException):
    """The process dies here: nothing of ours catches a BaseException, so no clean-up code runs."""


def _kill_at(stage: str, name: str):
    def crash_point(where: str, path: Path) -> None:
        if where == stage and path.name == name:
            raise _Killed(f"{stage} {name}")

    return crash_point


# ---- a save killed at every stage (tiny model, real process deaths) ------------------------------
STAGES = [
    ("new", "written"),  # a new step-N: files half written (one cut short), nothing sealed
    ("new", "sealed"),  # checksums and fsync done, not yet renamed
    ("new", "published"),  # renamed into place
    ("replace", "written"),  # re-saving an existing step-N (train.resume=<an older step>)
    ("replace", "sealed"),
    ("replace", "old-moved"),  # between the two renames: the old one moved aside, the new one not yet in place
    ("replace", "published"),  # the new one in place, the old one not yet deleted
    ("final", "written"),
    ("final", "sealed"),
    ("final", "old-moved"),
    ("final", "published"),
    ("prune", "pruning"),  # retention deleting an old checkpoint, after the new one is complete
]


@pytest.mark.parametrize(("scenario", "stage"), STAGES)
def test_a_save_killed_at_any_stage_leaves_the_newest_complete_checkpoint(scenario, stage, tmp_path):
    model, optimizer, scheduler = _tiny_state()
    out = tmp_path / "run"
    step1, step2, final = out / "checkpoints" / "step-1", out / "checkpoints" / "step-2", out / "final"
    save_checkpoint(step1, model, optimizer, scheduler, 1, NO_BEST)
    save_final(final, model, {"model": "tiny"})
    old = simplex_tensors(model)
    _train(model, optimizer, scheduler)
    new = simplex_tensors(model)
    assert not _equal(old, new)
    pid = os.fork()
    if pid == 0:  # the child saves and dies at the stage, without running any clean-up
        try:

            def die(where: str, path: Path) -> None:
                if where == stage:
                    if where == "written":  # killed while writing: a file cut short
                        victim = path / "simplex.safetensors"
                        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
                    os._exit(17)

            checkpoint._crash_point = die
            if scenario == "final":
                save_final(final, model, {"model": "tiny"})
            else:
                save_checkpoint(step1 if scenario == "replace" else step2, model, optimizer, scheduler, 2, NO_BEST)
            if scenario == "prune":
                prune_checkpoints(out, 1)
        finally:
            os._exit(0)  # reached only if the stage never came: the assertion below fails
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17, "the save never reached the stage"

    done = recover_interrupted_saves(out)  # the next start
    assert _leftovers(out) == [] and bool(done) == ((scenario, stage) != ("new", "published")), done
    published = stage == "published"
    if scenario in ("new", "prune"):
        assert latest_checkpoint(out) == (step2 if published or scenario == "prune" else step1)
        assert [p.name for p in complete_checkpoints(out)] == (
            ["step-2"] if scenario == "prune" else ["step-1", "step-2"] if published else ["step-1"]
        )
    target = final if scenario == "final" else latest_checkpoint(out)
    want = new if published or scenario == "prune" else old
    verify_folder(target, ("simplex.safetensors",), "")
    assert _equal(load_file(str(target / "simplex.safetensors")), want)
    if scenario != "final":
        load_checkpoint(target, *_tiny_state(seed=1))  # it resumes


def test_every_file_and_folder_is_flushed_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, Path]] = []
    fsync = checkpoint._fsync
    monkeypatch.setattr(checkpoint, "_fsync", lambda path: (events.append(("fsync", Path(path))), fsync(path)))
    monkeypatch.setattr(checkpoint, "_crash_point", lambda stage, path: events.append((stage, Path(path))))
    folder = tmp_path / "checkpoints" / "step-3"
    save_checkpoint(folder, *_tiny_state(), 3, NO_BEST)
    tmp = folder.parent / ".tmp-step-3"
    sealed = events.index(("sealed", tmp))
    flushed = {path for kind, path in events[:sealed] if kind == "fsync"}
    files = {tmp / p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}
    assert (tmp / "checksums.json") in files and files | {tmp} <= flushed
    assert ("fsync", folder.parent) in events[sealed:]  # the rename itself reaches the disk


# ---- the trainer: crash, NaN, full disk, retention (in-process runs on the small real model) ----
@pytest.fixture(scope="module")
def reference(small_assets, tmp_path_factory):
    """An uninterrupted run: 12 steps, checkpoints at 6 and 12."""
    model_dir, data = small_assets
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(run_args(model_dir, data, out, *QUICK)) == 0
    return out


def _same_as_reference(out: Path, reference: Path) -> None:
    for name in (
        "checkpoints/step-12/simplex.safetensors",
        "checkpoints/step-12/optimizer.safetensors",
        "final/simplex.safetensors",
    ):
        torch.testing.assert_close(load_file(str(out / name)), load_file(str(reference / name)), rtol=0, atol=0)
    keys = [(r["step"], r["split"]) for r in _rows(out)]
    assert keys == [(r["step"], r["split"]) for r in _rows(reference)]  # each step logged once, in order


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "name"), [("sealed", ".tmp-step-12"), ("written", ".tmp-final")])
def test_killed_during_a_save_resume_ends_where_an_uninterrupted_run_ends(
    stage, name, reference, small_assets, tmp_path, monkeypatch, capsys
):
    model_dir, data = small_assets
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "_crash_point", _kill_at(stage, name))
    with pytest.raises(_Killed):
        main(run_args(model_dir, data, out, *QUICK))
    monkeypatch.undo()
    parent = out / "checkpoints" if "step" in name else out
    assert (parent / name).is_dir()  # what the killed save left
    assert latest_checkpoint(out).name == ("step-6" if "step" in name else "step-12")
    capsys.readouterr()
    assert main(run_args(model_dir, data, out, *QUICK, "train.resume=auto")) == 0
    printed = capsys.readouterr().out
    assert f"removed {parent / name}" in printed
    assert "truncation: inputs over model.max_length=256 tokens are cut" in printed  # the policy, in the log
    assert "0 of 16 train, 0 of 16 dev, 0 of 41 test" in printed  # and what it cut
    assert _leftovers(out) == []
    _same_as_reference(out, reference)


def _poison(monkeypatch, steps):
    """A NaN loss at the given optimizer steps (1-based; one micro-batch per step)."""
    calls, real = itertools.count(1), recipe.task_loss

    def task_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if next(calls) in steps else loss

    monkeypatch.setattr(recipe, "task_loss", task_loss)


@pytest.mark.slow
def test_a_nan_loss_stops_in_one_line_and_the_last_checkpoint_stays(
    reference, small_assets, tmp_path, monkeypatch, capsys
):
    model_dir, data = small_assets
    out = tmp_path / "run"
    _poison(monkeypatch, {9})
    assert main(run_args(model_dir, data, out, *QUICK)) == 1
    line = _one_error_line(capsys, "non-finite loss or gradient (loss nan; gradient norm nan) at step 9")
    assert f"the last good checkpoint {out / 'checkpoints' / 'step-6'} is intact" in line
    assert [p.name for p in complete_checkpoints(out)] == ["step-6"] and not (out / "final").exists()
    assert _snapshot(out / "checkpoints/step-6") == _snapshot(reference / "checkpoints/step-6")  # untouched, same
    assert max(r["step"] for r in _rows(out)) == 8


@pytest.mark.slow
def test_skip_nonfinite_skips_counts_and_stops_after_too_many_in_a_row(small_assets, tmp_path, monkeypatch, capsys):
    model_dir, data = small_assets
    out = tmp_path / "skip"
    every2 = ("train.save_every=2", "train.max_steps=6", "eval.initial_test=false")
    _poison(monkeypatch, {3, 4})
    assert main(run_args(model_dir, data, out, *QUICK, *every2, "train.skip_nonfinite=true")) == 0
    train = [r for r in _rows(out) if r["split"] == "train"]
    assert [(r["step"], r["skipped"]) for r in train] == [(2, 0), (4, 2), (6, 0)]
    assert train[1]["loss"] is None and all(r["loss"] is not None for r in (train[0], train[2]))  # strict JSON
    step2, step4 = (load_file(str(out / f"checkpoints/step-{s}/simplex.safetensors")) for s in (2, 4))
    assert _equal(step2, step4)  # skipped steps do not move the simplex
    assert all(t.isfinite().all() for t in load_file(str(out / "final/simplex.safetensors")).values())

    monkeypatch.undo()
    _poison(monkeypatch, set(range(3, 100)))
    flags = ("train.skip_nonfinite=true", "train.max_nonfinite_in_row=3")
    assert main(run_args(model_dir, data, tmp_path / "stop", *QUICK, *every2, *flags)) == 1
    _one_error_line(capsys, "3 non-finite steps in a row (steps 3..5, train.max_nonfinite_in_row=3)")


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "final"])
def test_a_full_disk_during_a_save_stops_in_one_line_and_keeps_the_last_checkpoint(
    what, reference, small_assets, tmp_path, monkeypatch, capsys
):
    model_dir, data = small_assets
    out = tmp_path / "run"
    name = "save_checkpoint" if what == "checkpoint" else "save_final"
    stage = recipe if what == "checkpoint" else finish  # where the save is called: the loop, or the run's end
    real = getattr(stage, name)

    def full_disk_at_the_end(folder, *args, **kwargs):
        if folder.name in ("step-12", "final"):
            with _file_size_limit(64 * 1024):  # the simplex file is 147 KiB: its write fails in the kernel
                return real(folder, *args, **kwargs)
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(stage, name, full_disk_at_the_end)
    assert main(run_args(model_dir, data, out, *QUICK)) == 1
    target = out / "checkpoints" / "step-12" if what == "checkpoint" else out / "final"
    line = _one_error_line(capsys, f"writing {target} failed: ")
    assert "File too large" in line
    kept = "step-6" if what == "checkpoint" else "step-12"
    assert f"the last good checkpoint {out / 'checkpoints' / kept} is kept" in line
    assert _leftovers(out) == [] and not (out / "final").exists()  # the partial folder is removed
    assert _snapshot(out / "checkpoints/step-6") == _snapshot(reference / "checkpoints/step-6")


@pytest.mark.slow
def test_keep_checkpoints_keeps_the_newest_and_the_best(small_assets, tmp_path):
    model_dir, data = small_assets
    out = tmp_path / "run"
    flags = ("train.save_every=3", "train.eval_every=3", "train.keep_checkpoints=2", "eval.initial_test=false")
    assert main(run_args(model_dir, data, out, *QUICK, *flags)) == 0
    best = json.loads((out / "checkpoints/step-12/trainer_state.json").read_text())["best"]["by"]["centroid"]["steps"][
        0
    ]
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step-9", "step-12", f"step-{best}"}


# ---- a killed rank, a hung rank (2 processes) ----------------------------------------------------
def _torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hung_rank_fails_the_collective_after_the_timeout_and_the_nan_flag_is_shared():
    result = subprocess.run(
        _torchrun("-m", "tests.collective_worker", "4"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180
    )
    out = result.stdout + result.stderr
    assert "rank 0 takes the step: False" in out and "rank 1 takes the step: False" in out  # rank 1's NaN, both skip
    assert "rank 0 stopped: non-finite" in out and "rank 1 stopped: non-finite" in out  # both stop together
    waited = float(re.search(r"rank 0 collective failed after ([\d.]+) s", out).group(1))
    print(f"\nhung rank 1 -> rank 0's collective failed after {waited:.1f} s (engine.collective_timeout_s=4)")
    assert 3.5 <= waited < 20, out[-3000:]  # engine.collective_timeout_s=4, not torch's 30 minutes
    assert "error: rank 0: a collective failed (a peer process died, or hung past engine.collective_timeout_s)" in out
    assert result.returncode != 0


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    import psutil

    pids = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("LOCAL_RANK")
        except psutil.Error:
            continue
        if rank is not None and "dist_subspace.train" in " ".join(child.cmdline()):
            pids[int(rank)] = child.pid
    return pids


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_killed_between_checkpoints_stops_the_job_and_resume_is_exact(small_assets, tmp_path):
    """ZeRO-3 over 2 CPU processes: kill -9 rank 1 after the step-6 checkpoint, before step 12; torchrun stops
    rank 0; a relaunch with train.resume=auto ends bitwise where an uninterrupted 2-process run ends."""
    model_dir, data = small_assets
    args = ("engine.deepspeed=zero3_bf16", *QUICK, "eval.initial_test=false")
    reference, out = tmp_path / "reference", tmp_path / "run"
    train = ["-m", "dist_subspace.train"]
    done = subprocess.run(
        _torchrun(*train, *run_args(model_dir, data, reference, *args)),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    launcher = subprocess.Popen(
        _torchrun(*train, *run_args(model_dir, data, out, *args)),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and any(r["step"] >= 8 for r in _rows_safe(out))):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0][-3000:]
        time.sleep(0.05)
    pids = _rank_pids(launcher)
    assert set(pids) == {0, 1} and latest_checkpoint(out).name == "step-6"  # between two checkpoints
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    log = launcher.communicate(timeout=120)[0]
    stopped = time.monotonic() - killed
    print(f"\nkill -9 of rank 1 -> torchrun and rank 0 gone after {stopped:.2f} s")
    assert launcher.returncode != 0 and stopped < 60, log[-3000:]
    assert not _alive(pids[0])
    assert latest_checkpoint(out).name == "step-6" and not (out / "final").exists()

    done = subprocess.run(
        _torchrun(*train, *run_args(model_dir, data, out, *args, "train.resume=auto")),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _same_as_reference(out, reference)
    losses = [[r["loss"] for r in _rows(o) if r["split"] == "train"] for o in (out, reference)]
    assert losses[0] == losses[1]


def _rows_safe(out: Path) -> list[dict]:
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        with suppress(json.JSONDecodeError):  # a row being written
            rows.append(json.loads(line))
    return rows


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- the bad-input catalogue ---------------------------------------------------------------------
class Ctx:
    """What a catalogue case may use: a scratch folder, the small model and data, a finished run."""

    def __init__(self, tmp: Path, model_dir: Path, data: Path, reference: Path, monkeypatch) -> None:
        self.tmp, self.model_dir, self.data, self.reference, self.monkeypatch = (
            tmp,
            model_dir,
            data,
            reference,
            monkeypatch,
        )
        self.watch = tmp / "run"  # a folder that must be left exactly as it was

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def jsonl(self, name: str, rows: list[dict], tail: str = "") -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows) + tail)

    def model(self, name: str, config=True, tokenizer=True, weights="link", config_text=None) -> Path:
        folder = self.tmp / name
        folder.mkdir()
        if config_text is not None:
            (folder / "config.json").write_text(config_text)
        elif config:
            shutil.copy(self.model_dir / "config.json", folder)
        if tokenizer:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(self.model_dir / f, folder)
        source = self.model_dir / "model.safetensors"
        if weights == "link":
            (folder / "model.safetensors").symlink_to(source)
        elif weights == "cut":  # a download that stopped at 1 MiB
            with open(source, "rb") as f:
                (folder / "model.safetensors").write_bytes(f.read(1 << 20))
        elif weights == "bin":
            (folder / "pytorch_model.bin").write_bytes(b"a pickle, never opened")
        return folder

    def run_copy(self) -> Path:
        shutil.copytree(self.reference, self.watch)
        return self.watch

    def deepspeed(self, config: dict | str) -> str:
        text = config if isinstance(config, str) else json.dumps({"zero_optimization": {"stage": 3}, **config})
        return f"engine.deepspeed={self.file('ds.json', text)}"


def _reviews(n: int = 40) -> list[dict]:
    return [
        {"text": f"a {'great' if i % 2 else 'dull'} film number {i}", "label": ["negative", "positive"][i % 2]}
        for i in range(n)
    ]


def _jsonl_cut_short(ctx: Ctx) -> list[str]:
    path = ctx.jsonl("cut.jsonl", _reviews(), tail='{"text": "a fi')
    return [f"data.task={path}"]


def _csv_cut_short(ctx: Ctx) -> list[str]:
    text = "text,label\n" + "a great film,positive\n" * 20 + "a dull fi"
    return [f"data.task={ctx.file('cut.csv', text)}"]


def _mixed_labels(ctx: Ctx) -> list[str]:
    rows = [{**r, "label": i % 2} for i, r in enumerate(_reviews())] + [{"text": "fine", "label": "positive"}]
    return [f"data.task={ctx.jsonl('mixed.jsonl', rows)}"]


def _custom_code(ctx: Ctx) -> list[str]:
    config = json.loads((ctx.model_dir / "config.json").read_text())
    config.update(model_type="mycustom", auto_map={"AutoConfig": "conf.MyConfig"})
    folder = ctx.model("custom", config_text=json.dumps(config))
    marker = ctx.tmp / "EXECUTED"
    code = (
        "from transformers import PretrainedConfig\n\n\nclass MyConfig(PretrainedConfig):\n    model_type = 'mycustom'"
    )
    (folder / "conf.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n{code}")
    return [f"model.name_or_path={folder}"]


def _truncated_checkpoint(ctx: Ctx) -> list[str]:
    victim = ctx.run_copy() / "checkpoints/step-12/simplex.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])
    return ["train.resume=auto"]


def _corrupted_checkpoint(ctx: Ctx) -> list[str]:
    victim = ctx.run_copy() / "checkpoints/step-12/optimizer.safetensors"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data: same size, a header that still reads
    victim.write_bytes(bytes(data))
    return ["train.resume=auto"]


def _foreign_checkpoint(ctx: Ctx) -> str:
    folder = ctx.tmp / "elsewhere" / "step-6"
    shutil.copytree(ctx.reference / "checkpoints/step-6", folder)
    return str(folder)


def _unwritable(ctx: Ctx) -> list[str]:
    if os.geteuid() == 0:  # root writes through permission bits: /sys refuses new files even to root
        return ["train.output_dir=/sys/dist_subspace_run"]
    folder = ctx.tmp / "readonly"
    folder.mkdir(mode=0o555)
    return [f"train.output_dir={folder / 'run'}"]


def _no_tensorboard(ctx: Ctx) -> list[str]:
    ctx.monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` sees when it is absent
    return ["train.tensorboard=true"]


def _world_of_two(ctx: Ctx) -> list[str]:
    ctx.monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher of 2 processes sets it; refused before any rendezvous
    return [ctx.deepspeed({"train_batch_size": 5})]


TRAIN_CASES = {
    "misspelt key": (
        lambda c: ["simplex.vertice=3"],
        "unknown config key 'simplex.vertice'; did you mean simplex.vertices?",
    ),
    "misspelt section": (lambda c: ["trian.max_steps=3"], "did you mean train?"),
    "wrong type": (lambda c: ["train.max_steps=ten"], "train.max_steps must be int, got 'ten'"),
    "K < 1": (lambda c: ["simplex.vertices=0"], "simplex.vertices must be >= 1 (got 0)"),
    "P < 1": (lambda c: ["prefix.length=0"], "prefix.length must be >= 1 (got 0)"),
    "unknown sampling": (lambda c: ["simplex.sampling=token"], "simplex.sampling='token' is not one of"),
    "fp16": (lambda c: ["model.dtype=float16"], "model.dtype=float16 is not supported"),
    "malformed YAML": (lambda c: ["--config", str(c.file("bad.yaml", "train: [1, 2\n"))], "is not valid YAML"),
    "missing model folder": (lambda c: ["model.name_or_path=/no/such/model"], "no model folder there"),
    "unreadable model config": (
        lambda c: [f"model.name_or_path={c.model('m', config_text='{not json')}"],
        "config.json cannot be read",
    ),
    "model folder without tokenizer": (
        lambda c: [f"model.name_or_path={c.model('m', tokenizer=False)}"],
        "has no tokenizer (none of tokenizer.json",
    ),
    "pickled weights only": (
        lambda c: [f"model.name_or_path={c.model('m', weights='bin')}"],
        "has no .safetensors weights (found pytorch_model.bin: a pickle",
    ),
    "model weights cut short": (
        lambda c: [f"model.name_or_path={c.model('m', weights='cut')}"],
        "model.safetensors is truncated or corrupt",
    ),
    "model code without trust_remote_code": (_custom_code, "ships its own Python code (auto_map in config.json)"),
    "missing data file": (lambda c: [f"data.task={c.tmp / 'missing.jsonl'}"], "missing.jsonl' not found"),
    "empty data file": (lambda c: [f"data.task={c.file('empty.jsonl', '')}"], "empty.jsonl' is empty"),
    "JSON lines cut short": (_jsonl_cut_short, "cannot be read as .jsonl (line 41 is not valid JSON); is it cut short"),
    "CSV cut short": (_csv_cut_short, "row 20 has no label (an empty cell: is the file cut short?)"),
    "missing text column": (
        lambda c: ["data.text_field=review"],
        "no column 'review'; columns present: ['text', 'label']",
    ),
    "missing label column": (lambda c: ["data.label_field=stars"], "no column 'stars'"),
    "labels of mixed types": (
        _mixed_labels,
        "mixes numbers (e.g. 0) and strings (e.g. 'positive'); write every label the same way",
    ),
    "a label without a verbalizer word": (lambda c: ["data.label_words=[' good']"], "1 label words for 2 labels"),
    "a verbalizer word of several tokens": (
        lambda c: ["data.label_words=[' antidisestablishmentarianism', ' positive']"],
        "label word ' antidisestablishmentarianism' is 5 tokens for this tokenizer; choose one-token words",
    ),
    "more shots than a class has": (lambda c: ["data.shots_per_class=1000"], "fewer than k=1000"),
    "an empty text": (
        lambda c: [f"data.task={c.jsonl('blank.jsonl', [*_reviews(), {'text': '   ', 'label': 'positive'}])}"],
        "row 40 has an empty text in column 'text'; fill or remove such rows",
    ),
    "inputs longer than the model's context": (
        lambda c: ["model.max_length=8190"],
        "model.max_length=8190 + prefix.length=8 = 8198 positions, more than the model's 8192",
    ),
    "invalid DeepSpeed JSON": (
        lambda c: [c.deepspeed('{"zero_optimization": {"stage": 3,\n')],
        "is not valid JSON (Expecting property name enclosed in double quotes at line 2",
    ),
    "a batch the world size cannot divide": (_world_of_two, "train_batch_size=5 cannot be divided over 2 process(es)"),
    "a DeepSpeed micro-batch that contradicts the config": (
        lambda c: [c.deepspeed({"train_micro_batch_size_per_gpu": 16})],
        'sets train_micro_batch_size_per_gpu=16 but train.micro_batch_size=4; set it to "auto"',
    ),
    "NVMe offload on a machine without a GPU": (
        lambda c: [c.deepspeed({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})],
        "offloads to NVMe (async I/O), which needs a GPU machine",
    ),
    "bf16 forced on a machine without a GPU": (
        lambda c: [c.deepspeed({"bf16": {"enabled": True}})],
        "sets bf16.enabled=true but the compute dtype is float32 (model.dtype=float32)",
    ),
    "optimizer offload (there is no DeepSpeed optimizer)": (
        lambda c: [c.deepspeed({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})],
        "remove zero_optimization.offload_optimizer",
    ),
    "tensorboard not installed": (_no_tensorboard, "train.tensorboard=true needs the tensorboard package"),
    "an output folder that cannot be written": (_unwritable, "cannot be written"),
    "an output folder under a file": (
        lambda c: [f"train.output_dir={c.file('afile', 'x') / 'run'}"],
        "is a file, not a folder",
    ),
    "a resume path that is not a checkpoint": (lambda c: [f"train.resume={c.tmp}"], "is not a checkpoint folder"),
    "an output folder holding a different run": (
        lambda c: [f"train.output_dir={c.run_copy()}", "train.resume=auto", "simplex.vertices=4"],
        "holds a different run: its simplex.vertices=3, this config's 4",
    ),
    "an output folder holding a run of another model": (
        lambda c: [f"train.output_dir={c.run_copy()}", "train.resume=auto", f"model.name_or_path={c.model('other')}"],
        "holds a different run: its model.name_or_path=",
    ),
    "a checkpoint of another P": (
        lambda c: [f"train.resume={_foreign_checkpoint(c)}", "prefix.length=4"],
        "holds 3 vertices (R x K) of P=8 tokens, this config 3 (R=1 x K=3) of P=4",
    ),
    "a checkpoint file cut short": (_truncated_checkpoint, "simplex.safetensors is truncated or corrupt"),
    "a checkpoint file corrupted": (_corrupted_checkpoint, "optimizer.safetensors is truncated or corrupt (its sha256"),
    "a checkpoint without its checksums": (
        lambda c: ((c.run_copy() / "checkpoints/step-12/checksums.json").unlink(), ["train.resume=auto"])[1],
        "checksums.json is missing (format 2 folders are always sealed with it)",
    ),
}


@pytest.fixture
def no_backbone(monkeypatch):
    """Every refusal comes before the frozen model loads: loading it fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Engine, "load_backbone", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_input_is_refused_in_one_line_before_the_model_loads(
    case, reference, small_assets, tmp_path, monkeypatch, capsys, no_backbone
):
    model_dir, data = small_assets
    make, message = TRAIN_CASES[case]
    ctx = Ctx(tmp_path, model_dir, data, reference, monkeypatch)
    extra = make(ctx)
    before = _snapshot(ctx.watch)
    capsys.readouterr()
    assert main([*run_args(model_dir, data, ctx.watch, *QUICK), *extra]) == 2
    line = _one_error_line(capsys, message)
    assert len(line) < 500, line
    assert _snapshot(ctx.watch) == before  # nothing written or overwritten
    assert not (tmp_path / "EXECUTED").exists()  # no code shipped with a model ran


@pytest.mark.slow
def test_a_checkpoint_of_another_model_geometry_is_refused_after_loading(small_assets, reference, tmp_path, capsys):
    """Same K and P, another model (2 layers, not 4): only the loaded model can tell; one line, nothing written."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir, data = small_assets
    other = tmp_path / "two-layers"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(other)
    ctx = Ctx(tmp_path, model_dir, data, reference, None)
    out = tmp_path / "run"
    argv = [*run_args(other, data, out, *QUICK), f"train.resume={_foreign_checkpoint(ctx)}"]
    assert main(argv) == 2
    _one_error_line(capsys, "prefix.vertices: the checkpoint's shape (3, 4, 2, 3, 8, 64) differs from this model's")
    assert not out.exists()


def test_trust_remote_code_runs_the_models_code_only_when_set_and_says_so(small_assets, tmp_path, monkeypatch, capsys):
    import transformers.dynamic_module_utils as dynamic

    model_dir, data = small_assets
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    ctx = Ctx(tmp_path, model_dir, data, tmp_path, monkeypatch)
    args = [*run_args(model_dir, data, tmp_path / "run", *QUICK), *_custom_code(ctx), "model.trust_remote_code=true"]
    assert main(args) == 2  # allowed to run, then refused: the model type is not one the trainer supports
    out = capsys.readouterr()
    assert "model.trust_remote_code=true: Python files of" in out.out
    assert (tmp_path / "EXECUTED").exists() and "model type 'mycustom' is not supported" in out.err


EVALUATE_CASES = {
    "a folder that is not a run": (lambda c: c.tmp, "is not a run folder (no config.yaml)"),
    "a run without final/": (
        lambda c: (shutil.rmtree(c.run_copy() / "final"), c.watch)[1],
        "final/simplex.safetensors not found; pass the folder of a finished run",
    ),
    "final/ cut short": (
        lambda c: _damage(c.run_copy() / "final/simplex.safetensors", cut=True),
        "simplex.safetensors is truncated or corrupt (its sha256 differs from checksums.json)",
    ),
    "final/ corrupted": (
        lambda c: _damage(c.run_copy() / "final/simplex.safetensors", cut=False),
        "simplex.safetensors is truncated or corrupt (its sha256 differs from checksums.json)",
    ),
    "final/ cut short, written before checksums": (
        lambda c: (_damage(_before_formats(c.run_copy() / "final", "simplex_config.json"), cut=True), c.watch)[1],
        "simplex.safetensors is truncated or corrupt (Error while deserializing header",
    ),
    "final/ without its checksums": (
        lambda c: ((c.run_copy() / "final/checksums.json").unlink(), c.watch)[1],
        "checksums.json is missing (format 2 folders are always sealed with it)",
    ),
}


def _before_formats(folder: Path, manifest: str) -> Path:
    """Make ``folder`` look written before run-folder formats: no checksums.json, no "format" in its manifest.
    Returns its simplex.safetensors."""
    (folder / "checksums.json").unlink()
    state = json.loads((folder / manifest).read_text())
    del state["format"]
    (folder / manifest).write_text(json.dumps(state))
    return folder / "simplex.safetensors"


@pytest.mark.slow
def test_generate_refuses_a_cut_short_final_in_one_line(reference, small_assets, tmp_path, capsys, no_backbone):
    from dist_subspace.generate import main as generate_main

    ctx = Ctx(tmp_path, *small_assets, reference, None)
    run_dir = _damage(ctx.run_copy() / "final/simplex.safetensors", cut=True)
    assert generate_main([str(run_dir), "--prompt", "Review: fine\nSentiment:"]) == 2
    _one_error_line(capsys, "simplex.safetensors is truncated or corrupt (its sha256 differs from checksums.json)")


def _damage(path: Path, cut: bool) -> Path:
    data = bytearray(path.read_bytes())
    if cut:
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    return path.parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_evaluate_refuses_a_bad_run_folder_in_one_line(case, reference, small_assets, tmp_path, capsys, no_backbone):
    model_dir, data = small_assets
    make, message = EVALUATE_CASES[case]
    ctx = Ctx(tmp_path, model_dir, data, reference, None)
    run_dir = make(ctx)
    before = _snapshot(run_dir)
    assert evaluate_main([str(run_dir)]) == 2
    _one_error_line(capsys, message)
    assert _snapshot(run_dir) == before


def test_empty_texts_refused_in_a_users_file_skipped_in_a_hub_download(tmp_path, monkeypatch):
    """The user can fix their file; they cannot edit a hub data set (no network here: load_dataset is replaced)."""
    import datasets

    from dist_subspace.data.sources import load_splits

    rows = [{"question1": f"q{i}", "question2": "" if i == 3 else f"r{i}", "label": i % 2} for i in range(12)]
    files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl")}
    for path in files.values():
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 3 has an empty text in column 'question2'"):
        load_splits("qqp", shots_per_class=2, data_files=files)
    hub = datasets.DatasetDict(train=datasets.Dataset.from_list(rows), validation=datasets.Dataset.from_list(rows))
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name: hub)
    splits = load_splits("qqp", shots_per_class=2, test_size=0)
    assert 3 not in [e["id"] for e in splits.test] and len(splits.test) == 11


# ---- safe loading --------------------------------------------------------------------------------
UNPICKLERS = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib", "read_pickle", "allow_pickle"}


def unsafe_calls(source: str) -> list[str]:
    """What in Python ``source`` (code only: strings and comments are not read) could unpickle or run code:
    pickle-like modules, ``torch.load``, ``yaml.load``/``unsafe_load``, bare ``eval(``/``exec(``/``__import__(``,
    ``trust_remote_code=True``."""
    tokens = [
        t.string for t in tokenize.generate_tokens(StringIO(source).readline) if t.type in (tokenize.NAME, tokenize.OP)
    ]
    found = []
    for i, name in enumerate(tokens):
        before, after = tokens[i - 1] if i else "", tokens[i + 1] if i + 1 < len(tokens) else ""
        if name in UNPICKLERS:
            found.append(name)
        elif name in ("eval", "exec", "__import__") and after == "(" and before != ".":
            found.append(f"{name}(")
        elif name in ("load", "unsafe_load") and before == "." and i > 1 and tokens[i - 2] in ("torch", "yaml"):
            found.append(f"{tokens[i - 2]}.{name}")
        elif name == "trust_remote_code" and after == "=" and i + 2 < len(tokens) and tokens[i + 2] == "True":
            found.append("trust_remote_code=True")
    return found


def test_the_package_never_unpickles_or_runs_code_from_files():
    planted = "import pickle\nx = torch.load(f)\ny = eval('1')\nyaml.load(s)\nm(trust_remote_code=True)\nmodel.eval()\n"
    assert unsafe_calls(planted) == ["pickle", "torch.load", "eval(", "yaml.load", "trust_remote_code=True"]
    files = sorted((ROOT / "dist_subspace").rglob("*.py"))
    assert len(files) > 10
    assert {str(f.relative_to(ROOT)): unsafe_calls(f.read_text()) for f in files if unsafe_calls(f.read_text())} == {}


def test_the_engine_loads_weights_only_from_safetensors(tmp_path):
    """A folder whose weights are a pickled .bin: the engine's loader refuses it, it never unpickles it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_subspace.core.config import load_config

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "pytorch_model.bin")  # what an old checkpoint on a hub holds
    weights.unlink()
    engine = Engine(load_config(None, []))
    try:
        with pytest.raises(OSError, match="safetensors"):
            engine.load_backbone(str(tmp_path), decoder=True)
    finally:
        engine.end()


# ---- units: dtype, retention, truncation ---------------------------------------------------------
@pytest.mark.parametrize(
    ("capability", "flags", "dtype"),
    [
        (None, set(), torch.float32),  # a CPU without bf16 instructions: bf16 would be slower than fp32
        (None, {"avx512f", "avx512_bf16"}, torch.bfloat16),
        (None, {"amx_bf16", "amx_tile"}, torch.bfloat16),
        ((7, 0), {"avx512_bf16"}, torch.float32),  # a GPU decides, not the host CPU
        ((7, 5), set(), torch.float32),
        ((8, 0), set(), torch.bfloat16),
        ((8, 9), set(), torch.bfloat16),
        ((9, 0), set(), torch.bfloat16),
    ],
)
def test_auto_dtype_is_bf16_only_where_it_is_native(capability, flags, dtype):
    assert auto_dtype(capability, flags) == dtype  # V100 (7.0) and T4 (7.5) emulate bf16: float32 there


def test_compute_dtype_on_this_machine(tmp_path):
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float32
    else:
        want = torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & cpu_flags() else torch.float32
    assert compute_dtype("auto") == want and compute_dtype("bfloat16") == torch.bfloat16
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert cpu_flags(str(fake)) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "none")) == set()


def test_deepspeed_values_that_agree_with_the_config_pass():
    from dist_subspace.core.config import load_config

    cfg = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=2"])
    ds = {
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": "auto",
        "bf16": {"enabled": "auto"},
    }
    check_ds_config(ds, cfg, torch.float32, world_size=2, cuda=False)
    check_ds_config({**ds, "bf16": {"enabled": True}}, cfg, torch.bfloat16, world_size=2, cuda=True)


def test_retention_keeps_the_newest_and_the_protected(tmp_path):
    model, optimizer, scheduler = _tiny_state()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path / "checkpoints" / f"step-{step}", model, optimizer, scheduler, step, NO_BEST)
    removed = prune_checkpoints(tmp_path, 1, protect_steps=[2, None])
    assert [p.name for p in removed] == ["step-1", "step-3"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-2", "step-4"] and _leftovers(tmp_path) == []
    assert prune_checkpoints(tmp_path, 0) == []  # 0 keeps all


def test_truncation_keeps_the_prompt_end_and_is_counted(small_assets):
    from transformers import AutoTokenizer

    model_dir, _ = small_assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = TASKS["rotten_tomatoes"]
    short = {"text": "fine", "text_pair": None, "label": 1, "id": 0}
    long = {"text": " ".join(["very"] * 50) + " good", "text_pair": None, "label": 1, "id": 1}
    collator = Collator(tokenizer, task, decoder=True, max_length=12)
    assert collator.count_truncated([short, long]) == 1
    batch = collator([(0, short), (1, long)])
    end = tokenizer(task.template.format(text=long["text"]))["input_ids"][-12:]
    assert batch["input_ids"][1].tolist() == end  # decoders keep the last tokens: the answer position survives
    report = truncation_report(collator, {"train": [short, long], "test": [short]})
    assert report.endswith("1 of 2 train, 0 of 1 test") and "model.max_length=12" in report


def test_a_checkpoint_missing_a_file_is_refused(tmp_path):
    folder = tmp_path / "checkpoints" / "step-1"
    save_checkpoint(folder, *_tiny_state(), 1, NO_BEST)
    (folder / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors is missing; delete that checkpoint folder"):
        load_checkpoint(folder, *_tiny_state())
