"""Checkpoint directories: both layouts through one writer."""

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import attnkit.hf
from attnkit.checkpoints import load_checkpoint, save_checkpoint
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


def test_hf_translation_does_not_import_checkpoint_io():
    tree = ast.parse(Path(attnkit.hf.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name and name.startswith("attnkit.checkpoints") for name in imported), imported
