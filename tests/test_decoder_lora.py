"""LoRA fine-tuning of decoder LMs: only adapters train (on every projection), a short run lowers the
held-out loss, best/ holds the adapters alone and loads back onto its base (merged == unmerged), the
merged export is a Llama folder `transformers` reads with the same logits, chat JSONL puts the loss
on the assistant's tokens alone, resume is exact, and bad input is one sentence with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attnkit.chat import render_chat
from attnkit.checkpoints import ADAPTERS_FORMAT, base_fingerprint, build_model, load_checkpoint, save_checkpoint
from attnkit.cli import main
from attnkit.config import preset
from attnkit.data.conversations import encode_conversation, read_conversations
from attnkit.errors import AttnkitError
from attnkit.tokenizers import load_tokenizer, train_bpe
from attnkit.train import TrainConfig, Trainer
from attnkit.train.decoder_tasks import ChatTask

TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ANIMALS = ("cat", "dog", "bird", "fox", "owl")
PLACES = ("mat", "rug", "log", "box")
TEXT = "\n".join(f"the {ANIMALS[i % 5]} sat on the {PLACES[i % 4]} at {i % 7} o'clock." for i in range(600))
CHATS = [{"messages": [{"role": "user", "content": f"where is the {a}?"},
                       {"role": "assistant", "content": f"the {a} is on the {p}."}]}
         for a in ANIMALS for p in PLACES]
SHAPE = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, context_length=128)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def one_error_line(result) -> str:
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("using ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


pytestmark = pytest.mark.usefixtures("one_thread_module")


def random_decoder(cfg, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random Llama-shaped base (SwiGLU, GQA) with a byte-level BPE and a ChatML template; a text; chats."""
    root = tmp_path_factory.mktemp("decoder_lora")
    chat_text = "".join(m["content"] + "\n" for c in CHATS for m in c["messages"])
    tokenizer = train_bpe(TEXT + "\n" + chat_text, 320, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = TEMPLATE
    cfg = preset("llama-tiny", vocab_size=tokenizer.vocab_size, **SHAPE)
    save_checkpoint(root / "base", random_decoder(cfg, 0), tokenizer)
    (root / "text.txt").write_text(TEXT)
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return {"root": root, "base": root / "base", "text": root / "text.txt", "chats": root / "chats.jsonl", "cfg": cfg}


def lora_config(world, out, **changes) -> TrainConfig:
    settings = dict(name="lora", task="lm", init=str(world["base"]), data=str(world["text"]), lora_rank=8,
                    max_length=32, batch_size=8, max_steps=40, lr=1e-2, lr_decay_steps=40, warmup_steps=4,
                    weight_decay=0.0, eval_interval=20, eval_batches=4, log_interval=1, precision="fp32",
                    device="cpu", out_dir=str(out), seed=3)
    return TrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def lora(world):
    trainer = Trainer(lora_config(world, world["root"] / "run"), quiet=True)
    before = trainer.evaluate()["val_loss"]
    result = trainer.fit()
    return trainer, before, result


# --- what trains, what is saved ------------------------------------------------------------------------

def test_lora_on_a_decoder_trains_only_adapters_on_every_projection(lora, world):
    trainer, _, _ = lora
    model = trainer.raw_model
    assert model.lora_config.targets == ("q", "k", "v", "out", "gate", "up", "down")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora.lora_" in n for n in trainable)
    adapted = sorted(n[:-len(".lora.lora_a")] for n in trainable if n.endswith("lora_a"))
    assert adapted == [f"stack.layers.{i}.{m}" for i in range(2) for m in ("attn.out", "attn.qkv", "mlp.down", "mlp.up")]
    qkv, up = model.stack.layers[0].attn.qkv.lora, model.stack.layers[0].mlp.up.lora
    assert qkv.slices == ((0, 64), (64, 32), (96, 32))  # q, k, v of 4 query and 2 kv heads
    assert up.slices == ((0, 96), (96, 96))  # gate | up of the fused SwiGLU projection
    frozen = load_checkpoint(world["base"])[0].state_dict()
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_a_short_lora_finetune_lowers_the_held_out_loss(lora):
    trainer, before, result = lora
    assert result["step"] == 40
    assert 5.5 < before < 5.9  # ~ln(320) = 5.77: the random base knows nothing of the text
    assert result["best"] < 4.8 < before - 0.7, (before, result["best"])  # measured 5.71 -> 4.67
    evals = [r["val_loss"] for r in trainer.run.history if r["kind"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0] < before
    # the checkpoint, loaded onto its base, scores the same val windows the same
    merged, _ = load_checkpoint(Path(result["out"]) / "best")
    with torch.no_grad():
        again = trainer.task.evaluate(merged, device=torch.device("cpu"))["val_loss"]
    assert abs(again - result["best"]) <= 1e-5


def test_best_holds_the_adapters_alone_and_names_its_base(lora, world):
    _, _, result = lora
    best = Path(result["out"]) / "best"
    assert sorted(p.name for p in best.iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                      "chat_template.jinja", "config.json", "tokenizer.json",
                                                      "train_state.pt"]
    config = json.loads((best / "config.json").read_text())
    assert config["format"] == ADAPTERS_FORMAT and config["training"]["step"] in (20, 40)
    base, _ = load_checkpoint(world["base"])
    assert config["base"] == {"checkpoint": str(world["base"].resolve()), "fingerprint": base_fingerprint(base)}
    assert load_tokenizer(best).chat_template == TEMPLATE
    # a model of the same shape with other weights has another fingerprint
    assert base_fingerprint(random_decoder(world["cfg"], 1)) != base_fingerprint(base)


def test_merged_logits_equal_the_unmerged_adapters(lora):
    trainer, _, result = lora
    ids = torch.randint(0, trainer.model_cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    model = trainer.raw_model.eval()
    with torch.no_grad():
        unmerged = model(ids)
        merged_model, _ = load_checkpoint(Path(result["out"]) / "last")
        merged = merged_model(ids)
    model.train()
    assert not any(".lora" in k for k in merged_model.state_dict())
    assert (merged - unmerged).abs().max() <= 1e-5


def test_an_interrupted_and_resumed_lora_run_gives_the_same_losses(world, tmp_path):
    def cfg(out):
        return lora_config(world, tmp_path / out, max_steps=8, lr_decay_steps=8, eval_interval=4, eval_batches=1)

    straight = Trainer(cfg("a"), quiet=True).fit()["losses"]
    first = Trainer(cfg("b"), quiet=True).fit(stop_at=3)["losses"]
    rest = Trainer(cfg("b"), resume=True, quiet=True).fit()["losses"]
    assert len(first) == 3 and len(rest) == 5
    assert first + rest == straight
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / r / "last" / "adapter.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- every --ckpt command takes the run; export --merge ------------------------------------------------

def test_generate_takes_a_lora_run(lora):
    _, _, result = lora
    from attnkit.generate import Sampling, generate_text

    merged, tokenizer = load_checkpoint(Path(result["out"]) / "best")
    expected = generate_text(merged, tokenizer, "the cat", max_new_tokens=12, sampling=Sampling(temperature=0.0))
    out = ok(cli("generate", "--ckpt", result["out"], "-p", "the cat", "--max-new-tokens", 12, "--temperature", 0,
                 "--device", "cpu"))
    assert out == "the cat" + expected + "\n"
    assert len(tokenizer.encode(expected)) >= 10  # it generated, not stopped at once


def test_export_merge_writes_a_llama_folder_transformers_loads_with_the_same_logits(lora, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, _, result = lora
    assert "--merge" in one_error_line(cli("export", "--ckpt", result["out"], "--out", tmp_path / "no"))
    assert not (tmp_path / "no").exists()
    ok(cli("export", "--ckpt", result["out"], "--merge", "--out", tmp_path / "hf"))
    ours, tokenizer = load_checkpoint(Path(result["out"]) / "best")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode("the owl sat on the rug at 5 o'clock.")])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() <= 1e-4
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = CHATS[0]["messages"]
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == render_chat(tokenizer, messages, False)
    assert hf_tokenizer.eos_token == "<|endoftext|>"


def test_export_merge_of_a_checkpoint_without_adapters_exports_it_with_a_note(world, tmp_path):
    result = cli("export", "--ckpt", world["base"], "--merge", "--out", tmp_path / "hf")
    ok(result)
    assert "note:" in result.stderr and (tmp_path / "hf" / "model.safetensors").is_file()


def test_export_replaces_an_earlier_export_but_never_a_file_or_a_folder_of_other_things(world, tmp_path, monkeypatch):
    # --out was replaced whole: a folder's other files were deleted, a file became a folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    (tmp_path / "report.txt").write_text("precious")
    assert "holds other files and is no checkpoint" in one_error_line(
        cli("export", "--ckpt", world["base"], "--out", tmp_path / "mine"))
    assert "is a file" in one_error_line(cli("export", "--ckpt", world["base"], "--out", tmp_path / "report.txt"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious" == (tmp_path / "report.txt").read_text()
    for _ in range(2):  # an earlier export is replaced
        ok(cli("export", "--ckpt", world["base"], "--out", tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").is_file() and not [p for p in tmp_path.iterdir() if p.name[0] == "."]
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    ok(cli("export", "--ckpt", world["base"], "--out", "."))  # was: ValueError "has an empty name"
    assert (tmp_path / "here" / "model.safetensors").is_file()


@pytest.mark.parametrize("other", ["same shape", "other shape"])
def test_adapters_on_a_base_that_does_not_match_are_one_error(lora, world, tmp_path, other):
    _, _, result = lora
    cfg = world["cfg"] if other == "same shape" else world["cfg"].replace(n_layer=1)
    save_checkpoint(tmp_path / "other", random_decoder(cfg, 1), load_tokenizer(world["base"]))
    adapters = tmp_path / "adapters"
    shutil.copytree(Path(result["out"]) / "best", adapters)
    config = json.loads((adapters / "config.json").read_text())
    config["base"]["checkpoint"] = str(tmp_path / "other")
    (adapters / "config.json").write_text(json.dumps(config))
    line = one_error_line(cli("generate", "--ckpt", adapters, "-p", "the", "--max-new-tokens", 2))
    assert f"the adapters in {adapters} were trained on another model than {tmp_path / 'other'}" in line
    with pytest.raises(AttnkitError, match="another model"):
        load_checkpoint(adapters)


# --- chat: the loss on the assistant's tokens alone ------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "are you sure?"}, {"role": "assistant", "content": "yes, sure."}]


def test_chat_loss_is_on_the_assistant_tokens_and_their_end_of_turn_only(world, tmp_path):
    tokenizer = load_tokenizer(world["base"])
    end = tokenizer.hf.token_to_id("<|im_end|>")
    ids, in_loss = encode_conversation(tokenizer, CONVERSATION)
    assert tokenizer.decode(ids) == render_chat(tokenizer, CONVERSATION, add_generation_prompt=False)
    expected = tokenizer.encode("4") + [end] + tokenizer.encode("yes, sure.") + [end]
    assert [i for i, m in zip(ids, in_loss) if m] == expected
    # the header before each reply and the newline after its <|im_end|> are context
    first = in_loss.index(True)
    assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode([ids[ids.index(end, first) + 1]]) == "\n"
    # the task's targets: exactly those ids, each predicted from the token before it
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    task = ChatTask.from_config(TrainConfig(task="chat", init=str(world["base"]), data=str(data),
                                            val_data=str(data), batch_size=2))
    inputs, targets = task.train_rows[0]
    assert targets[targets != -100].tolist() == expected
    assert torch.equal(inputs[1:], torch.tensor(ids[1:-1])) and len(targets) == len(ids) - 1


def test_the_chat_loss_runs_the_output_layer_on_assistant_tokens_only_with_the_full_forwards_values(world, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in
                            [CONVERSATION, CONVERSATION[:2], [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello there"}]]))
    task = ChatTask.from_config(TrainConfig(task="chat", init=str(world["base"]), data=str(data),
                                            val_data=str(data), batch_size=3))
    batch = task._batch(task.train_rows, torch.device("cpu"))  # (3, T), right-padded
    inputs, targets = batch
    assert 0 < int((targets != -100).sum()) < targets.numel() // 2  # most positions are prompt or padding
    model = load_checkpoint(world["base"])[0]

    def full_loss():
        logits = model(inputs)  # (B, T, V): the reference, every position
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    heads = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: heads.append(tuple(o.shape)))
    loss = task.loss(model, batch)
    hook.remove()
    assert heads == [(int((targets != -100).sum()), model.cfg.vocab_size)]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = full_loss()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_prompt_response_lines_equal_the_messages_form(world, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps({"prompt": "where is the fox?", "response": "on the log."}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "where is the fox?"},
                                             {"role": "assistant", "content": "on the log."}]}) + "\n")
    (where_a, a), (where_b, b) = read_conversations(data)
    assert (where_a, where_b) == (f"{data} line 1", f"{data} line 3")
    assert a == b == [{"role": "user", "content": "where is the fox?"}, {"role": "assistant", "content": "on the log."}]
    tokenizer = load_tokenizer(world["base"])
    assert encode_conversation(tokenizer, a) == encode_conversation(tokenizer, b)


def test_a_template_that_rewrites_earlier_turns_is_one_clear_error(world):
    tokenizer = load_tokenizer(world["base"])
    tokenizer.chat_template = "{{ messages | length }}" + TEMPLATE  # the count changes the text before every turn
    with pytest.raises(AttnkitError, match="does not render a conversation as a growing text"):
        encode_conversation(tokenizer, CONVERSATION)


def test_finetune_on_chat_jsonl_picks_the_chat_task_and_lowers_its_loss(world, tmp_path):
    out = tmp_path / "chat-run"
    stdout = ok(cli("finetune", "--ckpt", world["base"], "--data", world["chats"], "--lora-rank", 4,
                    "--max-steps", 30, "--batch-size", 8, "--lr", 1e-2, "--device", "cpu", "--precision", "fp32",
                    "--threads", 1, "--out", out))
    assert "(chat) with LoRA rank 4" in stdout and "trainable parameters: 7,424 of 108,352" in stdout
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    # the same held-out chats (seeded split): 2 of 20, scored on "the A is on the P." and <|im_end|> alone
    task = ChatTask.from_config(TrainConfig(task="chat", init=str(world["base"]), data=str(world["chats"]),
                                            batch_size=8))
    tokenizer = task.tokenizer
    replies = [len(tokenizer.encode(m[-1]["content"])) + 1 for m in
               [json.loads(line)["messages"] for line in world["chats"].read_text().splitlines()]]
    assert len(task.val_rows) == 2 and evals[-1]["val_tokens"] == sum(int((t != -100).sum()) for _, t in task.val_rows)
    assert all(int((t != -100).sum()) in replies for _, t in task.val_rows)
    with torch.no_grad():
        before = task.evaluate(load_checkpoint(world["base"])[0], device=torch.device("cpu"))["val_loss"]
    assert before > 5.5 and evals[-1]["val_loss"] < 5.0, (before, evals[-1]["val_loss"])  # measured 5.68 -> 4.84


def test_a_jsonl_line_without_messages_is_one_error_naming_file_and_line(world, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps({"question": "hi"}) + "\n")
    line = one_error_line(cli("finetune", "--ckpt", world["base"], "--data", data, "--lora-rank", 4,
                              "--out", tmp_path / "run"))
    assert line.startswith(f'error: {data} line 2 has no "messages"')
    assert not (tmp_path / "run" / "best").exists()


# --- the real SmolLM2 exports to a folder transformers opens, chat template included -----------------------

def test_smollm2_exports_to_hugging_face_with_its_tokenizer_and_chat_template(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    ours, tokenizer = load_checkpoint("smollm2-135m")  # the GGUF, dequantized (`attnkit export` does the same)
    save_checkpoint(tmp_path / "hf", ours, tokenizer, layout="hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_chat(tokenizer, messages)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert hf_tokenizer(rendered)["input_ids"] == tokenizer.encode(rendered)
    assert hf_tokenizer.eos_token == "<|im_end|>"
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() <= 1e-4
