"""Training: exact resume, DDP == one process, the CLI path on the user's own text, bad input,
NaN stops, the lr schedule and which parameters decay; SIGTERM / Ctrl-C save and resume, timed
saves, the time budget, the automatic precision, sliding windows with RoPE."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attnkit.cli import main
from attnkit.errors import AttnkitError
import attnkit.train.loop as loop
from attnkit.train import (TrainConfig, Trainer, TrainingInterrupted, TrainingStopped, load_recipe, lr_at,
                           param_groups, read_train_state, resolve_config, resolve_precision)

ROOT = Path(__file__).resolve().parents[1]
LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
]
TEXT = "\n".join(LINES[i % 5] + f" {i}" for i in range(400))  # ~20k characters
TINY = {"context_length": 32, "n_layer": 2, "n_head": 2, "d_model": 32}


def tiny_config(out, **changes) -> TrainConfig:
    base = dict(name="tiny", data="unused", model="gpt2-char-tiny", model_overrides=dict(TINY), batch_size=4,
                max_steps=20, lr_decay_steps=20, warmup_steps=3, eval_interval=5, eval_batches=2, log_interval=1,
                precision="fp32", device="cpu", out_dir=str(out), seed=7)
    return TrainConfig(**{**base, **changes})


def split():
    n = int(len(TEXT) * 0.9)
    return TEXT[:n], TEXT[n:]


def run(cfg, resume=False, stop_at=None) -> list[float]:
    train_text, val_text = split()
    return Trainer(cfg, resume=resume, train_text=train_text, val_text=val_text, quiet=True).fit(stop_at)["losses"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- exact resume and DDP --------------------------------------------------------------------------

def test_resume_after_interruption_gives_identical_losses(tmp_path):
    straight = run(tiny_config(tmp_path / "a"))
    first = run(tiny_config(tmp_path / "b"), stop_at=10)
    assert read_train_state(tmp_path / "b" / "last")["step"] == 10
    rest = run(tiny_config(tmp_path / "b"), resume=True)
    assert len(straight) == 20 and len(first) == 10 and len(rest) == 10
    assert first + rest == straight  # bit-identical, not just close


def test_resume_continues_with_a_larger_step_budget(tmp_path):
    run(tiny_config(tmp_path, max_steps=6))
    more = run(tiny_config(tmp_path, max_steps=9), resume=True)
    assert len(more) == 3 and read_train_state(tmp_path / "last")["step"] == 9


DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.test_train import tiny_config, split
from attnkit.train import Trainer
train_text, val_text = split()
cfg = tiny_config({out!r}, batch_size=8, max_steps=6, grad_accum=2)
result = Trainer(cfg, train_text=train_text, val_text=val_text, quiet=True).fit()
if dist.get_rank() == 0:
    print("LOSSES", json.dumps(result["losses"]))
dist.destroy_process_group()
"""


def test_two_ddp_processes_match_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("LOSSES"))
    ddp = json.loads(line.split(" ", 1)[1])
    single = run(tiny_config(tmp_path / "one", batch_size=8, max_steps=6, grad_accum=2))
    assert len(ddp) == 6
    assert max(abs(a - b) for a, b in zip(ddp, single)) < 1e-4
    assert read_train_state(tmp_path / "ddp" / "last")["step"] == 6  # rank 0 wrote the checkpoint


# --- NaN, schedule, weight decay ------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train_text, val_text = split()
    trainer = Trainer(tiny_config(tmp_path), train_text=train_text, val_text=val_text, quiet=True)
    calls = {"n": 0}

    def poison(module, args, output):  # the 7th training forward returns NaN logits
        if module.training:
            calls["n"] += 1
            if calls["n"] == 7:
                return output * float("nan")
        return output

    trainer.raw_model.register_forward_hook(poison)
    with pytest.raises(TrainingStopped, match=r"became nan at step 7.*step 5\) is kept"):
        trainer.fit()
    state = read_train_state(tmp_path / "last")
    assert state["step"] == 5
    saved = json.loads((tmp_path / "last" / "config.json").read_text())["training"]
    assert saved["step"] == 5 and math.isfinite(saved["val_loss"])


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    assert lr_at(50, TrainConfig(lr=1e-3, warmup_steps=0, max_steps=100)) == pytest.approx(5.5e-4)  # min_lr = lr/10
    by_time = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_time=600, schedule="time")
    assert lr_at(5, by_time, elapsed=1.0) == pytest.approx(6e-4)  # warmup is still counted in steps
    assert lr_at(50, by_time, elapsed=300.0) == pytest.approx(5.5e-4)  # halfway through the time budget
    assert lr_at(50, by_time, elapsed=900.0) == pytest.approx(1e-4)


def test_the_optimizer_uses_the_scheduled_learning_rate_at_every_step(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=8, lr_decay_steps=8, warmup_steps=3)
    train_text, val_text = split()
    trainer = Trainer(cfg, train_text=train_text, val_text=val_text, quiet=True)
    seen = []
    for _ in range(8):
        trainer._train_step()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.step += 1
    assert seen == pytest.approx([lr_at(s, cfg) for s in range(8)])


def test_norms_biases_and_embeddings_get_no_weight_decay():
    from attnkit.config import preset
    from attnkit.models.decoder import DecoderLM

    model = DecoderLM(preset("gpt2-char-tiny", **TINY))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n}
    assert {"embed.tok.weight", "embed.pos.weight", "stack.norm.weight", "stack.norm.bias",
            "stack.layers.0.norm1.weight", "stack.layers.0.attn.qkv.bias", "stack.layers.1.mlp.up.bias"} <= undecayed
    assert "stack.layers.0.attn.qkv.weight" in decayed and "stack.layers.1.mlp.down.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head once


def test_recipes_load_with_their_documented_settings():
    gpu = load_recipe("shakespeare-char-gpu")
    model = gpu.model_overrides
    assert (model["n_layer"], model["n_head"], model["d_model"]) == (6, 6, 384)
    assert model["context_length"] == 256 and model["dropout"] == 0.2
    assert (gpu.batch_size, gpu.lr, gpu.max_steps, gpu.data, gpu.tokenizer) == (64, 1e-3, 5000, "shakespeare", "char")
    cpu = load_recipe("shakespeare-char")
    assert cpu.data == "shakespeare" and cpu.tokenizer == "char" and cpu.max_time <= 600 and cpu.schedule == "time"
    pixels = load_recipe("mnist-gpu")  # benchmarks/results.md's GPU bits/dim
    assert (pixels.model_overrides, pixels.batch_size, pixels.device, pixels.precision) == (
        {"n_layer": 8, "n_head": 8, "d_model": 512}, 64, "cuda", "bf16")
    assert pixels.task == "pixels" and pixels.data == "mnist" and pixels.schedule == "time"


# --- the command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One small run on the user's own text file, through the CLI, with no recipe."""
    folder = tmp_path_factory.mktemp("cli")
    corpus = folder / "my_text.txt"
    corpus.write_text(TEXT)
    out = folder / "run"
    args = ["train", "--data", str(corpus), "--model", "gpt2-char-tiny", "--max-steps", "4", "--out", str(out),
            "--device", "cpu", "--threads", "1", "--seed", "3"]
    result = CliRunner().invoke(main, args)
    return folder, corpus, out, args, result


def test_cli_trains_on_your_own_text_and_prints_a_sample(cli_run):
    folder, corpus, out, args, result = cli_run
    assert result.exit_code == 0, result.output
    assert "step 4 (max_steps" in result.output and "--- sample ---" in result.output
    sample = result.output.split("--- sample ---", 1)[1]
    assert len(sample.strip()) > 50
    for name in ("best", "last"):
        assert {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt"} <= {
            p.name for p in (out / name).iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [4]  # log_interval 10 -> only the last step
    assert rows[-1]["kind"] == "eval" and rows[-1]["val_loss"] < 5.0
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())


def test_cli_eval_prints_loss_and_perplexity(cli_run):
    folder, corpus, out, args, result = cli_run
    res = CliRunner().invoke(main, ["eval", "--ckpt", str(out / "best"), "--data", str(corpus), "--json",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert metrics["tokens"] == len(TEXT) - 1  # every next-character target scored once
    assert 0 < metrics["loss"] < 5 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    text = CliRunner().invoke(main, ["eval", "--ckpt", str(out / "best"), "--data", str(corpus), "--device", "cpu"])
    assert f"loss {metrics['loss']:.4f}" in text.output and "perplexity" in text.output


def test_cli_resume_continues_the_run(cli_run, tmp_path):
    folder, corpus, out, args, result = cli_run
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(out, copy)
    res = CliRunner().invoke(main, ["train", "--out", str(copy), "--resume", "--max-steps", "6", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "step 6 (max_steps" in res.output
    assert read_train_state(copy / "last")["step"] == 6


def test_cli_attend_writes_one_png_per_layer(cli_run, tmp_path):
    folder, corpus, out, args, result = cli_run
    res = CliRunner().invoke(main, ["attend", "--ckpt", str(out / "best"), "-p", "To be, or not", "--out",
                                    str(tmp_path / "maps")])
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert pngs == [f"layer_{i}.png" for i in range(4)]  # gpt2-char-tiny has 4 layers
    assert all((tmp_path / "maps" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def bad_inputs(folder: Path, corpus: Path, out: Path) -> dict[str, tuple[list[str], str]]:
    empty = folder / "empty.txt"
    empty.write_text("  \n")
    broken = folder / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    blocker = folder / "a_file"
    blocker.write_text("x")
    tiny = ["--model", "gpt2-char-tiny", "--max-steps", "1", "--threads", "1"]
    return {
        "missing corpus": (["train", "--data", str(folder / "nope.txt"), *tiny, "--out", str(folder / "x")],
                           "neither a known text recipe"),
        "empty corpus": (["train", "--data", str(empty), *tiny, "--out", str(folder / "x")], "is empty"),
        "invalid yaml": (["train", "--config", str(broken), "--out", str(folder / "x")], "not valid YAML"),
        "unknown recipe": (["train", "--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
        "unknown preset": (["train", "--data", str(corpus), "--model", "gpt9", "--out", str(folder / "x")],
                           "unknown model preset 'gpt9'"),
        "unwritable output": (["train", "--data", str(corpus), *tiny, "--out", str(blocker / "run")],
                              "choose a writable --out"),
        "existing run without --resume": (["train", "--data", str(corpus), *tiny, "--out", str(out)],
                                          "already holds a training run"),
        "resume with another config": (["train", "--data", str(corpus), *tiny, "--positional", "rope",
                                        "--out", str(out), "--resume"], "different config (changed: model_overrides"),
        "cuda without a GPU": (["train", "--data", str(corpus), *tiny, "--device", "cuda", "--out", str(out)],
                               "no CUDA GPU is available"),
        "eval of a missing checkpoint": (["eval", "--ckpt", str(folder / "nothing"), "--data", str(corpus)],
                                         "does not exist"),
        "window without sliding attention": (["train", "--data", str(corpus), *tiny, "--window", "4", "--out",
                                              str(folder / "x")], "add --attention sliding or drop --window"),
        "resume of no run": (["train", "--out", str(folder / "no-run"), "--resume"],  # was "nothing to train on"
                             "holds no run to resume (no last/train_state.pt); check --out, or drop --resume"),
    }


@pytest.mark.parametrize("case", ["missing corpus", "empty corpus", "invalid yaml", "unknown recipe", "unknown preset",
                                  "unwritable output", "existing run without --resume", "resume with another config",
                                  "cuda without a GPU", "eval of a missing checkpoint",
                                  "window without sliding attention", "resume of no run"])
def test_bad_input_prints_one_sentence_and_exits_2_leaving_checkpoints_alone(cli_run, case):
    folder, corpus, out, args, result = cli_run
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = {p: sha(p) for p in sorted(out.rglob("*")) if p.is_file()}
    argv, message = bad_inputs(folder, corpus, out)[case]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    error_lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert {p: sha(p) for p in sorted(out.rglob("*")) if p.is_file()} == before


# --- interruptions, timed saves, the time budget -------------------------------------------------

def train_losses(run_folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("stop_signal, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_finishes_the_step_saves_last_and_resume_gives_identical_losses(tmp_path, stop_signal,
                                                                                          exit_code):
    with_dropout = dict(model_overrides={**TINY, "dropout": 0.1})  # dropout draws from the loop's RNG
    straight = run(tiny_config(tmp_path / "a", **with_dropout))
    train_text, val_text = split()
    trainer = Trainer(tiny_config(tmp_path / "b", **with_dropout), train_text=train_text, val_text=val_text,
                      quiet=True)
    forwards = {"n": 0}

    def signal_during_step_7(module, args, output):
        if module.training:
            forwards["n"] += 1
            if forwards["n"] == 7:
                os.kill(os.getpid(), stop_signal)
        return output

    trainer.raw_model.register_forward_hook(signal_during_step_7)
    handler_before = signal.getsignal(stop_signal)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit()
    assert stop.value.exit_code == exit_code
    assert f"saved {tmp_path / 'b' / 'last'}" in str(stop.value) and "--resume" in str(stop.value)
    assert signal.getsignal(stop_signal) is handler_before  # the loop's handler is gone again
    assert read_train_state(tmp_path / "b" / "last")["step"] == 7  # step 7 was finished, not abandoned
    rest = run(tiny_config(tmp_path / "b", **with_dropout), resume=True)
    assert len(rest) == 13 and train_losses(tmp_path / "b") == straight  # bit-identical


def test_a_signal_during_the_final_evaluation_still_ends_as_an_interruption(tmp_path):
    train_text, val_text = split()
    trainer = Trainer(tiny_config(tmp_path, max_steps=3, eval_interval=100), train_text=train_text,
                      val_text=val_text, quiet=True)
    sent = []

    def signal_during_evaluation(module, args, output):
        if not module.training and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return output

    trainer.raw_model.register_forward_hook(signal_during_evaluation)
    with pytest.raises(TrainingInterrupted) as stop:  # exit 143, not a finished run that prints samples
        trainer.fit()
    assert stop.value.exit_code == 143 and sent and read_train_state(tmp_path / "last")["step"] == 3


def test_training_leaves_the_callers_global_rng_alone(tmp_path):
    cfg = tiny_config(tmp_path / "a", max_steps=3, model_overrides={**TINY, "dropout": 0.1})
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = run(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another caller state: the same run
    assert run(cfg.replace(out_dir=str(tmp_path / "b"))) == first


SIGNAL_RECIPE = """
name: sig
tokenizer: {kind: char}
model: {preset: gpt2-char-tiny, n_layer: 2, n_head: 2, d_model: 32, context_length: 32}
train: {batch_size: 4, lr_decay_steps: 1000, warmup_steps: 3, max_steps: 100000, eval_interval: 100000,
        eval_batches: 2, log_interval: 1, precision: fp32, device: cpu, seed: 5, sample_tokens: 0}
"""


def test_cli_sigterm_exits_143_after_saving_last_and_resume_matches_an_uninterrupted_run(tmp_path):
    recipe, corpus = tmp_path / "sig.yaml", tmp_path / "text.txt"
    recipe.write_text(SIGNAL_RECIPE)
    corpus.write_text(TEXT)
    given = ["--config", str(recipe), "--data", str(corpus), "--threads", "1"]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "attnkit", "train", *given, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ((out / "metrics.jsonl").exists() and len(train_losses(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert f"continue with `attnkit train --out {out} --resume`" in stderr
    step = read_train_state(out / "last")["step"]
    assert step >= 3
    resumed = CliRunner().invoke(main, ["train", "--out", str(out), "--resume", "--max-steps", str(step + 3),
                                        "--threads", "1"])
    assert resumed.exit_code == 0, resumed.output
    straight = CliRunner().invoke(main, ["train", *given, "--out", str(tmp_path / "straight"), "--max-steps",
                                         str(step + 3)])
    assert straight.exit_code == 0, straight.output
    assert train_losses(out) == train_losses(tmp_path / "straight") and len(train_losses(out)) == step + 3


class FakeClock:
    """loop.clock for tests: time moves only when a test says so (a slow step, a slow eval batch)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def slow_trainer(tmp_path, monkeypatch, *, step_s: float, eval_batch_s: float, **changes) -> tuple[Trainer, FakeClock]:
    """A trainer on a fake clock where each training forward takes step_s and each eval batch eval_batch_s."""
    fake = FakeClock()
    monkeypatch.setattr(loop, "clock", fake)
    train_text, val_text = split()
    trainer = Trainer(tiny_config(tmp_path, **changes), train_text=train_text, val_text=val_text, quiet=True)

    def take_time(module, args, output):
        fake.now += step_s if module.training else eval_batch_s
        return output

    trainer.raw_model.register_forward_hook(take_time)
    return trainer, fake


def test_save_every_minutes_writes_last_when_the_minutes_have_passed(tmp_path, monkeypatch):
    trainer, fake = slow_trainer(tmp_path, monkeypatch, step_s=40, eval_batch_s=0, max_steps=5, eval_interval=100,
                                 save_every_minutes=1)
    saves, save = [], trainer.save
    trainer.save = lambda name, metrics: (saves.append((name, trainer.step)), save(name, metrics))[1]
    trainer.fit()
    assert saves == [("last", 2), ("last", 4), ("best", 5), ("last", 5)]  # at 80 s and 160 s, then the end
    assert TrainConfig(save_every_minutes=5).config_hash() == TrainConfig().config_hash()  # a resume may change it


def test_max_time_stops_before_a_step_or_a_cadence_eval_that_would_pass_it(tmp_path, monkeypatch):
    # steps take 5 s, eval batches 2 s (2 per eval): steps 1-4 end at 20 s + one eval (4 s) = 24 s; a
    # 5th step would leave no room for the final eval, and the cadence eval at step 4 would eat into it
    trainer, fake = slow_trainer(tmp_path, monkeypatch, step_s=5, eval_batch_s=2, max_time=30, max_steps=100,
                                 eval_interval=2)
    result = trainer.fit()
    assert result["step"] == 4 and result["stopped_by"] == "max_time" and "final evaluation" in result["why"]
    evals = [r for r in trainer.run.history if r["kind"] == "eval"]
    assert [(r["step"], r["val_batches"]) for r in evals] == [(2, 2), (4, 2)]  # step 4's is the final one
    assert fake.now == 28 <= 30 and result["elapsed_s"] == 28
    state = read_train_state(tmp_path / "last")
    # the schedule's clock a resume starts from counts the last step and the final evaluation too
    assert state["step"] == 4 and state["scheduler"]["elapsed"] == 28


def test_an_evaluation_cut_short_does_not_compete_for_best(tmp_path, monkeypatch):
    # eval batches take 2 s until step 2's evaluation, then 12 s: the later ones fit 1 batch of 4, whose
    # lower loss (other windows) must not replace best/ (step 2, all 4 batches); last/ still has step 5
    trainer, fake = slow_trainer(tmp_path, monkeypatch, step_s=5, eval_batch_s=2, max_time=60, max_steps=100,
                                 eval_interval=2, eval_batches=4)
    trainer.raw_model.register_forward_hook(
        lambda module, args, output: setattr(fake, "now", fake.now + 10) if not module.training and trainer.step > 2
        else None)
    result = trainer.fit()
    evals = [(r["step"], r["val_batches"]) for r in trainer.run.history if r["kind"] == "eval"]
    assert evals == [(2, 4), (4, 1), (5, 1)] and result["step"] == 5
    later = [r["val_loss"] for r in trainer.run.history if r["kind"] == "eval" and r["step"] > 2]
    assert min(later) < trainer.best_eval["val_loss"]  # the cut-short losses look better, and are not taken
    assert read_train_state(tmp_path / "best")["step"] == 2 and read_train_state(tmp_path / "last")["step"] == 5


def test_an_evaluation_replaces_a_best_whose_val_loss_was_nan(tmp_path):
    train_text, val_text = split()
    trainer = Trainer(tiny_config(tmp_path, max_steps=1), train_text=train_text, val_text=val_text, quiet=True)
    trainer.best_eval = {"step": 1, "val_loss": float("nan"), "val_batches": 2}
    assert trainer._better({"step": 2, "val_loss": 3.0, "val_batches": 2})
    trainer.best_eval = {"step": 1, "val_loss": 2.0, "val_batches": 2}
    assert not trainer._better({"step": 2, "val_loss": 3.0, "val_batches": 2})
    assert trainer._better({"step": 2, "val_loss": 1.5, "val_batches": 2})


def test_an_evaluation_slower_than_the_budget_allows_is_cut_short_and_the_final_save_still_happens(
        tmp_path, monkeypatch):
    # eval batches take 10 s: the final eval (4 batches) is cut to the one batch that fits in 30 s
    trainer, fake = slow_trainer(tmp_path, monkeypatch, step_s=5, eval_batch_s=10, max_time=30, max_steps=100,
                                 eval_interval=100, eval_batches=4)
    result = trainer.fit()
    assert result["step"] == 4 and result["stopped_by"] == "max_time"
    assert result["val_batches"] == 1 and math.isfinite(result["val_loss"])
    assert fake.now == 30
    assert read_train_state(tmp_path / "last")["step"] == 4


# --- precision and positional defaults ----------------------------------------------------------------

def test_auto_precision_is_bf16_only_where_the_device_runs_it_fast(tmp_path, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_config(data="my_text.txt", device="cpu").precision == "bf16"  # stored, hashed, printed resolved
    assert resolve_config(recipe="shakespeare-char", device="cpu").precision == "bf16"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_config(data="my_text.txt", device="cpu").precision == "fp32"
    # the README's main job: bf16 measured 12x slower than fp32 on an AVX2-only CPU
    assert resolve_config(recipe="shakespeare-char", device="cpu").precision == "fp32"
    assert resolve_config(recipe="shakespeare-gru", device="cpu").precision == "fp32"
    train_text, val_text = split()
    assert Trainer(tiny_config(tmp_path, precision="auto"), train_text=train_text, val_text=val_text,
                   quiet=True).cfg.precision == "fp32"
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, ok=supported, **k: ok)
        assert resolve_precision("auto", cuda) == expected
    assert resolve_precision("fp32", cuda) == "fp32" and TrainConfig().precision == "auto"
    with pytest.raises(Exception, match="precision 'fp16' is not one of"):
        TrainConfig(precision="fp16").validate()


def test_a_sliding_window_without_a_positional_scheme_trains_with_rope():
    sliding = {"attention": "sliding", "window": 32}
    assert resolve_config(data="my_text.txt", model_overrides=sliding).model_overrides["positional"] == "rope"
    explicit = resolve_config(data="my_text.txt", model_overrides={**sliding, "positional": "learned"})
    assert explicit.model_overrides["positional"] == "learned"
    from_recipe = resolve_config(recipe="shakespeare-char-gpu", model_overrides=sliding)  # its model says learned
    assert from_recipe.model_overrides["positional"] == "learned"
    assert "positional" not in resolve_config(data="my_text.txt").model_overrides  # dense keeps the preset's


def test_a_window_is_refused_unless_the_attention_is_sliding():
    for attention in (None, "dense", "bigbird"):
        with pytest.raises(AttnkitError, match="the model's attention is (dense|bigbird); add --attention sliding"):
            resolve_config(data="my_text.txt", model_overrides={"attention": attention, "window": 4})
    cfg = resolve_config(data="my_text.txt", model_overrides={"attention": "sliding", "window": 4})
    assert cfg.model_overrides == {"attention": "sliding", "window": 4, "positional": "rope"}
    audio = resolve_config(data="wavs", task="audio", model_overrides={"window": 64})  # audio-small is sliding
    assert audio.model_overrides == {"window": 64}


def test_a_sliding_window_model_trains_under_bf16_autocast(tmp_path):
    # --data with --attention sliding is bf16 by default on an AVX512 CPU: the windowed attention must take it
    sliding = {**TINY, "attention": "sliding", "window": 8, "positional": "rope"}
    losses = run(tiny_config(tmp_path, precision="bf16", max_steps=2, model_overrides=sliding))
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


# --- weight averaging (ema) ------------------------------------------------------------------------

def test_the_weight_average_follows_its_decay_and_swaps_in_without_copies():
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    average = loop.WeightAverage(model, decay=0.9)
    expected = [s.clone() for s in start]
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
        average.update(step)
        decay = min(0.9, (1 + step) / (10 + step))  # 0.1, 0.18, ... then 0.9 from step 80 on; here below it
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    trained = [p.detach().clone() for p in model.parameters()]
    assert not torch.allclose(expected[0], trained[0])
    storage = model.weight.data_ptr()
    with average.swapped():
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e)
        assert [t.data_ptr() for t in average.trained()][0] == storage  # the trained weights, not a copy
        with average.swapped():  # nested: stays in
            torch.testing.assert_close(model.weight.detach(), expected[0])
    for p, t in zip(model.parameters(), trained):
        assert torch.equal(p.detach(), t)


def test_ema_checkpoints_hold_the_average_and_a_resumed_run_equals_the_straight_one(tmp_path):
    ema = dict(ema=0.9, max_steps=12, lr_decay_steps=12, eval_interval=6)
    train_text, val_text = split()
    trainer = Trainer(tiny_config(tmp_path / "a", **ema), train_text=train_text, val_text=val_text, quiet=True)
    straight = trainer.fit()["losses"]
    from attnkit.checkpoints import read_weights

    saved = read_weights(tmp_path / "a" / "last")
    state = read_train_state(tmp_path / "a" / "last")
    params = [n for n, p in trainer.raw_model.named_parameters()]
    for name, p, average, trained in zip(params, trainer.raw_model.parameters(), trainer.average.average,
                                         state["trained_weights"]):
        assert torch.equal(trained, p.detach())  # train_state.pt keeps the trained weights for resuming
        if name in saved:
            assert torch.equal(saved[name], average) and not torch.equal(saved[name], p.detach())
    with trainer.averaged():  # the evaluation is of the average: last/'s val loss is that of its weights
        again = trainer.evaluate()["val_loss"]
    assert again == pytest.approx(json.loads((tmp_path / "a" / "last" / "config.json").read_text())["training"]
                                  ["val_loss"], abs=1e-6)
    first = run(tiny_config(tmp_path / "b", **ema), stop_at=6)
    rest = run(tiny_config(tmp_path / "b", **ema), resume=True)
    assert first + rest == straight
    assert torch.equal(read_weights(tmp_path / "b" / "last")[params[0]], saved[params[0]])


def test_best_follows_the_tasks_metric_and_the_val_loss_until_that_metric_is_measured_or_ties(tmp_path):
    train_text, val_text = split()
    trainer = Trainer(tiny_config(tmp_path, max_steps=35, lr_decay_steps=35), train_text=train_text,
                      val_text=val_text, quiet=True)
    trainer.task.best_by, trainer.task.best_higher = "val_score", True
    # (val_score, val_loss) at steps 5, 10, ..., 35: a tie on the score goes to the lower val loss
    # (BLEU is 0.00 on every evaluation of short targets, and best/ should still move on)
    scripted_metrics = iter([(None, 3.0), (1.0, 2.5), (3.0, 2.4), (2.0, 2.0), (3.0, 2.6), (3.0, 2.3), (None, 1.0)])
    evaluate = trainer.task.evaluate
    saved = []

    def scripted(*args, **kwargs):
        metrics = evaluate(*args, **kwargs)
        score, loss = next(scripted_metrics)
        return {**metrics, "val_loss": loss, **({} if score is None else {"val_score": score})}

    trainer.task.evaluate = scripted
    save = trainer.save
    trainer.save = lambda name, metrics: (saved.append((name, trainer.step)), save(name, metrics))[1]
    result = trainer.fit()
    assert [step for name, step in saved if name == "best"] == [5, 10, 15, 30]  # the loss, the score, the tie
    assert result["best_by"] == "val_score" and result["best"] == 3.0
    assert trainer.describe_best() == "best val score 3.0000"
    assert read_train_state(tmp_path / "last")["best_eval"]["val_score"] == 3.0


def test_the_final_evaluation_is_kept_half_again_its_measured_time_within_a_fifth_of_the_budget(monkeypatch):
    monkeypatch.setattr(loop, "clock", lambda: 0.0)
    budget = loop.TimeBudget(100.0, already_used=0.0, grad_accum=1)
    budget.step_s, budget.eval_batch_s = 1.0, 2.0
    assert budget.final_eval_reserve(3) == 9.0  # 1.5 x 3 batches x 2 s
    assert budget.final_eval_reserve(10) == 20.0  # 30 s capped at 20% of 100 s
    budget.ends_at = 9.5  # 1 s step + 9 s reserve no longer fit
    assert "final evaluation (~9.0 s)" in budget.step_stop_reason(3)


SMALL_SMOLLM2 = {"context_length": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_model": 32, "d_ff": 64}


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_a_model_trained_from_scratch_takes_its_special_ids_from_its_tokenizer(tmp_path, tokenizer):
    from attnkit.generate import _stop_ids
    from attnkit.models.decoder import DecoderLM
    from attnkit.train.tasks import LanguageModelingTask

    # smollm2-135m's preset names bos 1 / eos 2: in a char vocabulary of this text id 2 is " "
    cfg = tiny_config(tmp_path, model="smollm2-135m", model_overrides=SMALL_SMOLLM2, tokenizer=tokenizer,
                      vocab_size=300)
    train_text, val_text = split()
    task = LanguageModelingTask.from_config(cfg, train_text=train_text, val_text=val_text)
    ids = (task.model_config.bos_id, task.model_config.eos_id)
    if tokenizer == "char":
        assert task.tokenizer.decode([2]) == " " and ids == (None, None)
        assert _stop_ids(task.tokenizer, DecoderLM(task.model_config)) == []
    else:
        assert ids == (None, task.tokenizer.hf.token_to_id("<|endoftext|>")) == (None, 0)
        assert _stop_ids(task.tokenizer, DecoderLM(task.model_config)) == [0]


@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_a_val_file_is_the_validation_text_of_a_model_trained_from_scratch(tmp_path, task):
    from attnkit.train.tasks import make_task

    corpus, held_out = tmp_path / "train.txt", tmp_path / "val.txt"
    corpus.write_text(TEXT)
    held_out.write_text("QRS " * 300)  # characters the corpus does not have
    cfg = tiny_config(tmp_path, data=str(corpus), val_data=str(held_out))
    if task == "mlm":
        cfg = cfg.replace(task="mlm", model="bert-tiny", model_overrides=TINY, tokenizer="wordpiece", vocab_size=100)
    made = make_task(cfg)
    tokens = lambda text: len(made._tokens(text)) if task == "mlm" else len(made.tokenizer.encode(text))  # noqa: E731
    assert len(made.train_tokens) == tokens(TEXT)  # all of --data trains
    assert len(made.val_tokens) == tokens("QRS " * 300)
    if task == "lm":
        assert made.tokenizer.decode(made.val_tokens[:4].tolist()) == "\ufffd" * 3 + " "


@pytest.fixture
def run_with_val_fraction(tmp_path):
    """A checkpoint as `attnkit train` writes it, of a run that held out 25% of its text."""
    from attnkit.checkpoints import save_checkpoint
    from attnkit.config import preset
    from attnkit.models.decoder import DecoderLM
    from attnkit.tokenizers import CharTokenizer

    torch.manual_seed(0)
    model = DecoderLM(preset("gpt2-char-tiny", **TINY, vocab_size=CharTokenizer.train(TEXT).vocab_size))
    training = {"step": 1, "train_config": tiny_config(tmp_path, val_fraction=0.25).to_dict()}
    save_checkpoint(tmp_path / "run" / "best", model, CharTokenizer.train(TEXT), extra_json={"training": training})
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return tmp_path / "run", corpus


def eval_json(*argv) -> dict:
    res = CliRunner().invoke(main, ["eval", *argv, "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_eval_scores_the_split_its_run_held_out(run_with_val_fraction):
    run, corpus = run_with_val_fraction
    val, train = TEXT[-round(len(TEXT) * 0.25):], TEXT[:-round(len(TEXT) * 0.25)]
    assert eval_json("--ckpt", str(run), "--data", str(corpus), "--split", "val")["tokens"] == len(val) - 1
    assert eval_json("--ckpt", str(run), "--data", str(corpus), "--split", "train")["tokens"] == len(train) - 1
    assert eval_json("--ckpt", str(run), "--data", str(corpus))["tokens"] == len(TEXT) - 1  # all of a file


def test_eval_of_a_text_recipe_scores_its_text_as_it_is_and_refuses_a_test_split(run_with_val_fraction,
                                                                                   monkeypatch):
    from attnkit.data import text

    run, _ = run_with_val_fraction
    monkeypatch.setitem(text.RECIPES, "tiny-recipe", lambda: TEXT)
    assert eval_json("--ckpt", str(run), "--data", "tiny-recipe", "--split", "all")["tokens"] == len(TEXT) - 1
    assert eval_json("--ckpt", str(run), "--data", "tiny-recipe")["tokens"] == round(len(TEXT) * 0.25) - 1  # val
    res = CliRunner().invoke(main, ["eval", "--ckpt", str(run), "--data", "tiny-recipe", "--split", "test"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "a text has no test split" in res.output


def test_the_default_sample_prompt_is_a_token_the_char_tokenizer_knows(tmp_path):
    from attnkit.train.tasks import LanguageModelingTask

    flat = TEXT.replace("\n", " ")  # no newline: "\n" would be the unknown id 0
    train_text, val_text = flat[:18000], flat[18000:]
    task = LanguageModelingTask.from_config(tiny_config(tmp_path), train_text=train_text, val_text=val_text)
    assert task.tokenizer.encode("\n") == [0]
    assert task.sample_prompt("\n") == "T" == train_text[0]
    assert task.sample_prompt("To be") == "To be"
    with_newlines = LanguageModelingTask.from_config(tiny_config(tmp_path), train_text=split()[0], val_text=split()[1])
    assert with_newlines.sample_prompt("\n") == "\n"
