"""Parity with Hugging Face transformers: same logits, same greedy tokens, round trip export."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from attnkit.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from attnkit.cli import main  # noqa: E402
from attnkit.errors import AttnkitError  # noqa: E402
from attnkit.generate import Sampling, generate_tokens  # noqa: E402
from attnkit.tokenizers import CharTokenizer  # noqa: E402

VOCAB = 97


def hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=96, n_layer=2, n_head=4, n_embd=32,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2 if kind != "llama-mqa" else 1, hidden_size=32, intermediate_size=48,
                      tie_word_embeddings=kind == "llama-tied", rope_theta=500.0,
                      bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms, so a wrong mapping of norm weights cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def saved(model, tmp_path):
    directory = tmp_path / "hf"
    model.save_pretrained(directory)
    CharTokenizer([chr(c) for c in range(32, 32 + VOCAB - 1)]).save(directory)
    return directory


def padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 0
    return ids, mask


def padded_logits_difference(hf, ours) -> float:
    """The largest |logit| difference over the real tokens of the left-padded batch (transformers
    given the positions counted from the mask, as attnkit counts them)."""
    ids, mask = padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(ids, attention_mask=mask)
    real = mask.bool()
    return float((mine[real] - theirs[real]).abs().max())


KINDS = ["gpt2", "llama", "llama-tied", "llama-mqa"]


@pytest.mark.parametrize("kind", KINDS)
def test_hf_checkpoint_gives_the_same_logits_on_a_padded_batch(kind, tmp_path):
    hf = hf_model(kind)
    ours, _ = load_checkpoint(saved(hf, tmp_path))
    assert padded_logits_difference(hf, ours) <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_hf_generate(kind, tmp_path):
    hf = hf_model(kind)
    ours, _ = load_checkpoint(saved(hf, tmp_path))
    ids, mask = padded_batch()
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)[:, 11:]
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    mine = torch.stack([t for t, _ in generate_tokens(ours, prompts, max_new_tokens=32, sampling=Sampling(0.0))], 1)
    assert mine.tolist() == theirs.tolist()


def test_cli_generate_on_an_hf_folder_matches_hf_greedy(tmp_path):
    hf = hf_model("llama")
    directory = saved(hf, tmp_path)
    tok = CharTokenizer([chr(c) for c in range(32, 32 + VOCAB - 1)])
    prompt = "To be, or not"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(directory), "-p", prompt, "--temperature", "0",
                                       "--max-new-tokens", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.rstrip("\n") == prompt + tok.decode(theirs.tolist())


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-tied"])
def test_exported_checkpoint_loads_in_transformers_with_the_same_logits(kind, tmp_path):
    hf = hf_model(kind)
    ours, tok = load_checkpoint(saved(hf, tmp_path))
    save_checkpoint(tmp_path / "ours", ours, tok)
    ours, tok = load_checkpoint(tmp_path / "ours")  # through attnkit's own format too
    save_checkpoint(tmp_path / "exported", ours, tok, layout="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max() <= 1e-5
        assert (back(ids).logits - hf(ids).logits).abs().max() <= 1e-5


def test_every_end_token_of_a_list_stops_generation_as_in_transformers_and_survives_export(tmp_path):
    """Llama 3 configs name several end tokens (end of text, end of turn): any of them ends a row."""
    hf = hf_model("llama")
    prompt = "To be, or not"
    tok = CharTokenizer([chr(c) for c in range(32, 32 + VOCAB - 1)])
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        free = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    second = free[6]  # a token the model writes: the second end token of the list
    hf.config.eos_token_id = hf.generation_config.eos_token_id = [VOCAB - 1, second]
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert theirs == free[:free.index(second) + 1] and len(theirs) < 24
    directory = saved(hf, tmp_path)
    ours, _ = load_checkpoint(directory)
    assert ours.cfg.end_ids == [VOCAB - 1, second]
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(directory), "-p", prompt, "--temperature", "0",
                                       "--max-new-tokens", "24", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.rstrip("\n") == prompt + tok.decode(theirs[:-1])  # the end token is not printed
    save_checkpoint(tmp_path / "exported", ours, tok, layout="hf")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "exported").eos_token_id == [VOCAB - 1, second]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_end_tokens_that_only_generation_config_names_stop_generation_too(kind, tmp_path):
    # Llama 3 Instruct: config.json names end of text, generation_config.json adds end of turn; the
    # second was ignored (transformers stopped at it, attnkit wrote on)
    hf = hf_model(kind)
    hf.config.eos_token_id = VOCAB - 1
    hf.generation_config.eos_token_id = [VOCAB - 1, 66]
    directory = saved(hf, tmp_path)
    assert json.loads((directory / "config.json").read_text())["eos_token_id"] == VOCAB - 1
    ours, _ = load_checkpoint(directory)
    assert ours.cfg.end_ids == [VOCAB - 1, 66]
    save_checkpoint(tmp_path / "exported", ours, layout="hf")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "exported").eos_token_id == [VOCAB - 1, 66]


def test_a_llama_activation_other_than_silu_is_refused(tmp_path):
    hf = hf_model("llama")
    hf.config.hidden_act = "gelu_pytorch_tanh"
    with pytest.raises(AttnkitError, match="activation 'gelu_pytorch_tanh' is not supported"):
        load_checkpoint(saved(hf, tmp_path))


def test_a_gpt2_model_saved_without_the_transformer_prefix_loads_as_transformers_loads_it(tmp_path):
    """GPT2Model (the hub's gpt2 weights) names its body wte.weight, h.0.attn.c_attn.bias, ... and has no lm_head."""
    body = transformers.GPT2Model(hf_model("gpt2").config).eval()
    with torch.no_grad():  # random norms, so a wrong mapping of norm weights cannot hide
        for name, p in body.named_parameters():
            if "ln_" in name:
                p.uniform_(0.5, 1.5)
    directory = saved(body, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    ours, _ = load_checkpoint(directory)
    assert padded_logits_difference(hf, ours) <= 1e-4
    assert torch.equal(hf.lm_head.weight, body.wte.weight)  # transformers' head is the token table, as attnkit's


@pytest.mark.parametrize("setting", [{"scale_attn_weights": False}, {"reorder_and_upcast_attn": True}])
def test_gpt2_attention_settings_give_the_same_logits_as_transformers(setting, tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=96, n_layer=2, n_head=4, n_embd=32, bos_token_id=0,
                     eos_token_id=None, pad_token_id=0, **setting)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.config._attn_implementation = "eager"  # the only path that reads reorder_and_upcast_attn
    ours, _ = load_checkpoint(saved(hf, tmp_path))
    assert padded_logits_difference(hf, ours) <= 1e-4


def test_gpt2_scores_scaled_by_inverse_layer_number_are_refused(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=96, n_layer=2, n_head=4, n_embd=32,
                     scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(AttnkitError, match="^GPT-2 checkpoints with scale_attn_by_inverse_layer_idx .* are not supported"):
        load_checkpoint(saved(GPT2LMHeadModel(cfg), tmp_path))


def test_gpt2_unscaled_scores_survive_export(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=96, n_layer=2, n_head=4, n_embd=32, scale_attn_weights=False)
    ours, tok = load_checkpoint(saved(GPT2LMHeadModel(cfg).eval(), tmp_path))
    assert ours.cfg.scale_scores is False
    save_checkpoint(tmp_path / "exported", ours, tok, layout="hf")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    assert back.config.scale_attn_weights is False
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind, key", [("gpt2", "n_embd"), ("llama", "hidden_size"), ("llama", "vocab_size")])
def test_a_config_without_a_required_key_names_the_key_and_the_file(kind, key, tmp_path):
    directory = saved(hf_model(kind), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config[key]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(AttnkitError, match=rf"^the config.json in {re.escape(str(directory))} has no '{key}', which a {kind} config needs"):
        load_checkpoint(directory)
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(directory), "-p", "a", "--max-new-tokens", "1"])
    assert result.exit_code == 2 and f"has no '{key}'" in result.output and "Traceback" not in result.output


def test_old_style_llama_rope_scaling_is_refused_by_its_type(tmp_path):
    directory = saved(hf_model("llama"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}  # as pre-4.4x configs write it
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(AttnkitError, match="^Llama rope scaling 'linear' is not supported yet; only default RoPE is$"):
        load_checkpoint(directory)
