"""Checkpoint directories: run folders stand for their best/, both layouts through one writer."""

import ast
import contextlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import attnkit.hf
from attnkit.checkpoints import load_checkpoint, resolve_checkpoint_dir, save_checkpoint
from attnkit.cli import main
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.models.decoder import DecoderLM
from attnkit.tokenizers import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.!?\n"
CFG = ModelConfig(vocab_size=len(ALPHABET) + 1, context_length=48, n_layer=2, n_head=2, d_model=32)
IDS = torch.randint(0, len(ALPHABET), (1, 9), generator=torch.Generator().manual_seed(1))


def tiny_lm(seed):
    torch.manual_seed(seed)
    return DecoderLM(CFG).eval()


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(list(ALPHABET))


@pytest.fixture()
def run_folder(tmp_path, tok):
    """What `attnkit train --out` leaves: best/ and last/ with different weights."""
    best, last = tiny_lm(0), tiny_lm(1)
    save_checkpoint(tmp_path / "run" / "best", best, tok)
    save_checkpoint(tmp_path / "run" / "last", last, tok)
    return tmp_path / "run", best


def test_a_run_folder_loads_its_best_checkpoint_and_says_so_on_stderr(run_folder, capsys):
    run, best = run_folder
    model, _ = load_checkpoint(run)
    torch.testing.assert_close(model(IDS), best(IDS))
    captured = capsys.readouterr()
    assert captured.err == f"using {run / 'best'} (the best checkpoint of the run folder {run})\n"
    assert captured.out == ""


def test_generate_on_a_run_folder_prints_what_its_best_checkpoint_prints(run_folder):
    run, _ = run_folder
    args = ["-p", "ab", "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"]
    from_run = CliRunner().invoke(main, ["generate", "--ckpt", str(run), *args])
    from_best = CliRunner().invoke(main, ["generate", "--ckpt", str(run / "best"), *args])
    assert from_run.exit_code == 0 and from_best.exit_code == 0, from_run.output
    assert from_run.stdout == from_best.stdout and from_run.stdout.startswith("ab")
    assert from_run.stderr == f"using {run / 'best'} (the best checkpoint of the run folder {run})\n"
    assert from_best.stderr == ""


def test_a_run_folder_with_only_last_names_the_problem_and_the_fix(tmp_path, tok):
    run = tmp_path / "run"
    save_checkpoint(run / "last", tiny_lm(0), tok)
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(run), "-p", "x"])
    assert result.exit_code == 2
    assert result.output == f"error: the run folder {run} has no best/ checkpoint yet; pass {run / 'last'} to use its last one\n"
    with pytest.raises(AttnkitError, match="has no best/ checkpoint yet"):
        load_checkpoint(run)


def test_an_empty_folder_is_still_not_a_checkpoint(tmp_path):
    assert resolve_checkpoint_dir(tmp_path) == tmp_path
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(tmp_path), "-p", "x"])
    assert result.exit_code == 2 and result.output.startswith(f"error: {tmp_path} is not a checkpoint (no config.json)")


def test_plain_checkpoint_folders_load_as_before_without_a_notice(tmp_path, tok, capsys):
    model = tiny_lm(0)
    plain = save_checkpoint(tmp_path / "plain", model, tok)
    save_checkpoint(plain / "best", tiny_lm(1), tok)  # a best/ inside a checkpoint does not win over its config.json
    hf_folder = save_checkpoint(tmp_path / "hf", model, tok, layout="hf")
    for folder in (plain, hf_folder, str(plain)):
        assert resolve_checkpoint_dir(folder) == Path(folder)
        loaded, loaded_tok = load_checkpoint(folder)
        torch.testing.assert_close(loaded(IDS), model(IDS))
        assert loaded_tok.encode("hi!") == tok.encode("hi!")
    assert capsys.readouterr().err == ""


def test_hf_layout_writes_hugging_face_names_in_fp32(tmp_path, tok):
    model = tiny_lm(0).to(torch.bfloat16)
    folder = save_checkpoint(tmp_path / "hf", model, tok, layout="hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2 and "format" not in config
    weights = load_file(str(folder / "model.safetensors"))
    assert "transformer.h.1.attn.c_attn.weight" in weights and "lm_head.weight" not in weights  # tied
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert (folder / "tokenizer.json").is_file()
    loaded, _ = load_checkpoint(folder)
    torch.testing.assert_close(loaded(IDS), model.float()(IDS))


def test_hf_layout_refuses_a_model_without_a_hugging_face_shape_and_writes_nothing(tmp_path, tok):
    torch.manual_seed(0)
    sliding = DecoderLM(ModelConfig(**{**CFG.to_dict(), "attention": "sliding", "window": 8})).eval()
    with pytest.raises(AttnkitError, match="no Hugging Face equivalent"):
        save_checkpoint(tmp_path / "hf", sliding, tok, layout="hf")
    with pytest.raises(AttnkitError, match="unknown checkpoint layout"):
        save_checkpoint(tmp_path / "gguf", sliding, tok, layout="gguf")
    assert list(tmp_path.iterdir()) == []


GPT2_CFG = ModelConfig(vocab_size=len(ALPHABET) + 1, context_length=48, n_layer=1, n_head=4, d_model=32)
LLAMA_CFG = GPT2_CFG.replace(norm="rmsnorm", mlp="swiglu", positional="rope", bias=False, n_kv_head=2)


@pytest.mark.parametrize("cfg, named", [
    (GPT2_CFG.replace(n_kv_head=1), "GPT-2 has no setting for n_kv_head=1"),
    (GPT2_CFG.replace(embedding_norm=True), "GPT-2 has no setting for embedding_norm=True"),
    (GPT2_CFG.replace(position_offset=2), "GPT-2 has no setting for position_offset=2"),
    (GPT2_CFG.replace(scale_embeddings=True), "GPT-2 has no setting for scale_embeddings=True"),
    (GPT2_CFG.replace(token_types=2), "GPT-2 has no setting for token_types=2"),
    (GPT2_CFG.replace(norm_position="post"), "GPT-2 has no setting for norm_position='post'"),
    (GPT2_CFG.replace(attention="sliding", window=8), "GPT-2 has no setting for attention='sliding'"),
    (GPT2_CFG.replace(positional="alibi"), "GPT-2 has no setting for positional='alibi'"),
    (GPT2_CFG.replace(mlp="relu"), "GPT-2 has no setting for mlp='relu'"),
    (LLAMA_CFG.replace(scale_embeddings=True), "Llama has no setting for scale_embeddings=True"),
    (LLAMA_CFG.replace(scale_scores=False), "Llama has no setting for scale_scores=False"),
    (LLAMA_CFG.replace(embedding_norm=True), "Llama has no setting for embedding_norm=True"),
    (LLAMA_CFG.replace(token_types=2), "Llama has no setting for token_types=2"),
    (LLAMA_CFG.replace(attention="sliding", window=8), "Llama has no setting for attention='sliding'"),
    (LLAMA_CFG.replace(positional="alibi"), "Llama has no setting for positional='alibi'"),
    (LLAMA_CFG.replace(norm="layernorm"), "Llama has no setting for norm='layernorm'"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_hf_layout_names_the_setting_a_hugging_face_decoder_lacks_and_writes_nothing(cfg, named, tmp_path, tok):
    model = DecoderLM(cfg.validate()).eval()
    with pytest.raises(AttnkitError, match=rf"^this model has no Hugging Face equivalent: {named} \(export needs "):
        save_checkpoint(tmp_path / "hf", model, tok, layout="hf")
    assert list(tmp_path.iterdir()) == []


def tiny(name, **changes):
    from attnkit.config import preset

    size = dict(vocab_size=40, context_length=32, n_layer=1, n_head=2, d_model=16, d_ff=32)
    seq2seq = dict(encoder_layers=1) if preset(name).family == "seq2seq" else {}
    return preset(name, **size, **seq2seq).replace(**changes)


@pytest.mark.parametrize("cfg, named", [
    (tiny("bert-tiny", scale_scores=False), "this encoder has no Hugging Face equivalent: BERT has no setting for "
                                            "scale_scores=False"),
    (tiny("bert-tiny", scale_embeddings=True), "this encoder has no Hugging Face equivalent: BERT has no setting for "
                                               "scale_embeddings=True"),
    (tiny("bert-tiny", position_offset=2), "this encoder has no Hugging Face equivalent: BERT has no setting for "
                                           "position_offset=2"),
    *[(tiny(name, token_types=2), "this encoder-decoder has no Hugging Face equivalent: BART, Marian or T5 has no "
                                  "setting for token_types=2") for name in ("bart-base", "marian-base", "t5-small")],
], ids=lambda x: x if isinstance(x, str) else "")
def test_hf_layout_names_the_setting_an_encoder_or_encoder_decoder_lacks_and_writes_nothing(cfg, named, tmp_path):
    from attnkit.checkpoints import build_model

    with pytest.raises(AttnkitError, match=rf"^{named} \(export needs "):
        save_checkpoint(tmp_path / "hf", build_model(cfg.validate()).eval(), layout="hf")
    assert list(tmp_path.iterdir()) == []


def test_hf_translation_does_not_import_checkpoint_io():
    tree = ast.parse(Path(attnkit.hf.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name and name.startswith("attnkit.checkpoints") for name in imported), imported


def test_a_checkpoint_folder_gets_the_umask_permissions(tmp_path):
    import os

    from attnkit.checkpoints import build_model, save_checkpoint
    from attnkit.config import preset

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ck", build_model(preset("gpt2-char-tiny", n_layer=1, d_model=32, n_head=2)))
    finally:
        os.umask(old)
    assert ((tmp_path / "ck").stat().st_mode & 0o777) == 0o755
    assert ((tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777) == 0o644


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_folder_leaves_the_old_or_the_new_one_even_if_interrupted(tmp_path, monkeypatch, exchange):
    import attnkit.checkpoints as checkpoints

    target = tmp_path / "last"
    with checkpoints.atomic_directory(target) as tmp:
        (tmp / "step").write_text("1")
    if not exchange:  # the two renames' path (another OS): a Ctrl-C between them puts the old folder back
        monkeypatch.setattr(checkpoints, "_exchange", lambda a, b: False)
    replace, calls = checkpoints.os.replace, []

    def interrupted_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return replace(src, dst)
    monkeypatch.setattr(checkpoints.os, "replace", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt) if not exchange else contextlib.nullcontext():
        with checkpoints.atomic_directory(target) as tmp:
            (tmp / "step").write_text("2")
    assert (target / "step").read_text() == ("2" if exchange else "1") and len(calls) == (0 if exchange else 3)  # 3: put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary or old folder left


@pytest.mark.parametrize("files, says", [
    ({"config.json": "[]"}, r"config\.json holds a JSON list, not a model config"),  # was AttributeError
    ({"config.json": '{"format": "attnkit", "version": 2}'}, r'an attnkit config without its "model" settings'),
    ({"config.json": '{"model_type": "gpt2"}', "model.safetensors.index.json": "{oops"},  # was JSONDecodeError
     r"model\.safetensors\.index\.json is not a safetensors index"),
    ({"config.json": '{"model_type": "gpt2"}', "model.safetensors.index.json": "[1]"},
     r"is not a safetensors index"),
])
def test_a_malformed_config_or_index_is_one_sentence(tmp_path, files, says):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(AttnkitError, match=says):
        load_checkpoint(tmp_path)
