"""GGUF import: a synthetic Llama GGUF of every tensor type attnkit reads (against the model it was
written from, and against `transformers`), the real SmolLM2-135M file (greedy text, logits, tokenizer
and chat template against `transformers`), and the bad files a user can give."""

import json

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from attnkit import hf, kernels, quant
from attnkit.checkpoints import build_model, load_checkpoint, named_checkpoint_dir
from attnkit.chat import render_chat
from attnkit.cli import main
from attnkit.config import preset
from attnkit.errors import AttnkitError
from attnkit.gguf import _tensor, read_gguf
from attnkit.tokenizers import load_tokenizer

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# GGUF tensor -> type, one of each that attnkit reads (gate and up differ: fused parts of two kinds)
TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.F16, "attn_output": Q.BF16,
         "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order for its RoPE (convert_hf_to_gguf.py's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab():
    from tokenizers import pre_tokenizers

    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]


def _encode(qtype, w: np.ndarray) -> np.ndarray:
    """w in the GGUF type -> what GGUFWriter.add_tensor takes, and what a reader dequantizes it to."""
    if qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if qtype == Q.BF16:
        bf = torch.from_numpy(w).bfloat16()
        return bf.view(torch.uint8).numpy().reshape(w.shape[0], -1), bf.float().numpy()
    raw = gguf.quants.quantize(w.astype(np.float32), qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(w.shape)


def write_gguf(path, arch="llama", override=None, seed=0, add_bos=None, rope_freqs=None):
    """A 2-layer Llama GGUF with random weights of the TYPES; -> the attnkit model of its dequantized weights."""
    torch.manual_seed(seed)
    vocab = _vocab()
    cfg = preset("llama-tiny", vocab_size=len(vocab), n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96,
                 context_length=128, tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5, bos_id=1, eos_id=2)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms away from 1
    _, state = hf.to_hf(cfg, {k: v.float() for k, v in model.state_dict().items()})
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if rope_freqs is not None:  # llama.cpp's Llama 3.1 RoPE scaling: a factor per frequency
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    writer.add_chat_template(TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(2):
        for ours, theirs in [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
                             ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                             ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                             ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    dequantized = {}
    for hf_name, gguf_name in names.items():
        w = state[hf_name].numpy()
        short = gguf_name.split(".")[-2] if gguf_name.startswith("blk") else gguf_name.split(".")[0]
        qtype = (override or {}).get(short, TYPES.get(short, Q.F32))
        if short in ("attn_q", "attn_k"):
            w = _permute(w, 4 if short == "attn_q" else 2)
        data, back = _encode(qtype, w)
        if short in ("attn_q", "attn_k"):  # the model has them in Hugging Face's order
            back = _unpermute(back.reshape(w.shape), 4 if short == "attn_q" else 2)
        writer.add_tensor(gguf_name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        dequantized[hf_name] = torch.from_numpy(np.ascontiguousarray(back.reshape(w.shape))).float()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, expected_state = hf.from_hf(hf.config_to_hf(cfg), dequantized, path)
    model.load_state_dict(expected_state, strict=False)
    return model


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_gguf(path)


def test_every_tensor_type_loads_as_written(synthetic):
    path, expected = synthetic
    model, tokenizer = load_checkpoint(path)
    ids = torch.tensor([[5, 70, 200, 3, 9, 120, 44, 261]])
    with torch.inference_mode():
        assert torch.allclose(model(ids), expected(ids), atol=1e-5, rtol=0)
    assert model.cfg.n_layer == 2 and model.cfg.kv_heads == 2 and model.cfg.tie_embeddings
    assert tokenizer.chat_template == TEMPLATE and tokenizer.eos_id == 2


def test_synthetic_file_matches_transformers(synthetic):
    from transformers import AutoModelForCausalLM

    path, _ = synthetic
    model, _ = load_checkpoint(path)
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 70, 200, 3, 9, 120, 44, 261, 17, 80]])
    with torch.inference_mode():
        assert torch.allclose(model(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_kept_blocks_are_the_files_own(synthetic):
    path, _ = synthetic
    raw = read_gguf(path, keep_quantized=True).hf_state
    assert quant.kind_of(raw["model.layers.0.self_attn.q_proj.weight"]) == "q4_0"
    assert quant.kind_of(raw["model.embed_tokens.weight"]) == "q8_0"
    if not quant_kernels():
        pytest.skip("no AVX512-VNNI kernels here")
    model, _ = load_checkpoint(path, quantize="int4")
    layer = model.stack.layers[0]
    assert layer.attn.out.__class__.__name__ == "QuantizedLinear"
    # q (Q4_0) and k (Q4_1) are fused as one weight of two kinds: dequantized, then Q4_0; gate (Q8_0) | up (Q4_0) too
    assert layer.mlp.down.kind == "q4_1" and model.lm_head.kind == "q8_0"


def quant_kernels():
    from attnkit.kernels import quantized_kernels_available

    return quantized_kernels_available()


def _cli(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result.exit_code, result.output


def test_bad_files_are_one_clear_sentence(tmp_path, synthetic):
    path, _ = synthetic
    other = tmp_path / "gpt2.gguf"
    write_gguf(other, arch="gpt2")
    code, out = _cli("generate", "--ckpt", other, "-p", "the")
    assert code == 2 and "is a 'gpt2' model" in out and "Traceback" not in out
    odd = tmp_path / "q5.gguf"
    write_gguf(odd, override={"attn_v": Q.Q5_0})
    code, out = _cli("generate", "--ckpt", odd, "-p", "the")
    assert code == 2 and "blk.0.attn_v.weight is of type Q5_0" in out
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, out = _cli("generate", "--ckpt", cut, "-p", "the")
    assert code == 2 and "truncated or corrupted" in out and "Traceback" not in out


# --- the real SmolLM2-135M-Instruct file --------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return named_checkpoint_dir("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


def test_smollm2_greedy_says_paris():
    code, out = _cli("generate", "--ckpt", "smollm2-135m", "-p", "The capital of France is", "--temperature", "0",
                     "--max-new-tokens", "3")
    assert code == 0 and out.startswith("The capital of France is Paris")


MIXED = ["The capital of France is", "def f(x):\n    return x ** 2  # 12345 + 0.5",
         "Café naïve façade, 東京 and 北京 🙂🚀", "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
         "  leading spaces\tand tabs\n\nnew lines 3.14159 1,000,000"]


def test_smollm2_logits_equal_transformers(smollm2, smollm2_transformers, monkeypatch):
    """With torch's F.linear, as transformers runs its products, within 1e-4. attnkit's default for
    several rows on AVX512 CPUs multiplies by oneDNN's packed copy of each weight, whose other
    summation order moves these logits (up to 40 in size) by up to 1.6e-4 after 30 layers (measured:
    4.6e-5, 7.9e-5, 1.6e-4 on the three texts, against 4.3e-5, 0, 0 with F.linear): within 2e-4 there."""
    model, tokenizer = load_checkpoint("smollm2-135m")
    theirs, _ = smollm2_transformers
    for text in MIXED[:3]:
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.inference_mode():
            want = theirs(ids).logits
            assert (model(ids) - want).abs().max().item() <= 2e-4, text
            with monkeypatch.context() as m:
                m.setattr(kernels, "_packing_on", lambda: False)
                assert torch.allclose(model(ids), want, atol=1e-4, rtol=0), text


def test_smollm2_tokenizer_and_chat_template_equal_transformers(smollm2, smollm2_transformers, tmp_path):
    _, their_tokenizer = smollm2_transformers
    tokenizer = read_gguf(smollm2).tokenizer
    for text in MIXED:
        ids = tokenizer.encode(text)
        assert ids == their_tokenizer(text, add_special_tokens=False).input_ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|><|im_end|>") == [1, 2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "A colour?"}]
    for conversation in (messages, messages[1:]):  # with and without a system message (the template adds its own)
        for add in (True, False):
            assert render_chat(tokenizer, conversation, add) == their_tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add)
    tokenizer.save(tmp_path)  # tokenizer.json + chat_template.jinja
    again = load_tokenizer(tmp_path)
    assert again.encode(MIXED[2]) == tokenizer.encode(MIXED[2]) and again.chat_template == tokenizer.chat_template
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_smollm2_block_types_dequantize_as_gguf_does(smollm2):
    reader = gguf.GGUFReader(str(smollm2))
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        ours = _tensor(t, keep_quantized=False)
        reference = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        assert torch.equal(ours, torch.from_numpy(np.array(reference)).float()), t.name
    assert seen == {"Q8_0", "Q4_1", "F32"}


def test_quantize_without_the_kernels_is_a_one_line_warning(synthetic, monkeypatch):
    from attnkit import kernels

    path, _ = synthetic
    monkeypatch.setattr(kernels, "quantized_kernels_available", lambda: False)
    result = CliRunner().invoke(main, ["generate", "--ckpt", str(path), "-p", "the", "--max-new-tokens", "3",
                                       "--temperature", "0", "--quantize", "int4"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().count("\n") == 0 and "decoding with dequantized weights instead" in result.stderr
    assert result.stdout.startswith("the")


def test_a_gguf_that_adds_bos_starts_prompts_with_it_once(tmp_path):
    # tokenizer.ggml.add_bos_token was ignored: prompts went in without <s>, unlike llama.cpp's
    from attnkit.generate import _encode_prompt

    for add_bos, first in ((True, [1]), (False, []), (None, [])):
        write_gguf(tmp_path / "m.gguf", add_bos=add_bos)
        _, tokenizer = load_checkpoint(tmp_path / "m.gguf")
        text = tokenizer.encode("the")
        assert _encode_prompt(tokenizer, "the", None) == first + text
        assert _encode_prompt(tokenizer, tokenizer.decode([1]) + "the", None) == [1] + text  # a template's own <s>
        assert tokenizer.encode("the") == text  # training text stays as it was


def test_a_gguf_with_rope_frequency_factors_is_refused(tmp_path):
    # Llama 3.1 / 3.2 store their RoPE scaling as rope_freqs: it was dropped (logits off by 0.15)
    write_gguf(tmp_path / "scaled.gguf", rope_freqs=[1.0, 1.7, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0])
    with pytest.raises(AttnkitError, match="scales RoPE per frequency"):
        load_checkpoint(tmp_path / "scaled.gguf")
    write_gguf(tmp_path / "plain.gguf", rope_freqs=[1.0] * 8)  # factors of 1 change nothing
    load_checkpoint(tmp_path / "plain.gguf")
