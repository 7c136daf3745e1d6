"""LoRA: adapters on fused projections leave base names alone, merge into exactly their rows,
and round-trip through adapter folders."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from attnkit.checkpoints import _unique_state, build_model
from attnkit.config import preset
from attnkit.errors import AttnkitError
from attnkit.layers import CrossAttention
from attnkit.lora import (
    LoRAConfig,
    apply_lora,
    load_adapters,
    lora_state,
    merge_lora,
    save_adapters,
    trainable_parameters,
)

VOCAB = 40
GPT2 = preset("gpt2-char-tiny", vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, context_length=32)
# GQA (4 query heads, 2 kv heads) and SwiGLU, so q / k / v and gate / up are unequal and equal slices
LLAMA = preset("llama-tiny", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48,
               context_length=32)
CASES = {"gpt2": (GPT2, ("q", "v", "out", "up", "down")), "llama": (LLAMA, ("q", "v", "up", "down"))}
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def base(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("case", CASES)
def test_apply_trains_only_adapters_and_keeps_outputs(case):
    cfg, targets = CASES[case]
    model = base(cfg)
    before_logits, before_state = model(IDS), _unique_state(model)
    apply_lora(model, LoRAConfig(rank=4, targets=targets))
    assert torch.equal(model(IDS), before_logits)  # B = 0 at the start
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora.lora_" in n for n in trainable)
    after = _unique_state(model)
    assert all(torch.equal(after[k], v) for k, v in before_state.items())  # base names unchanged
    assert sorted(set(after) - set(before_state)) == sorted(lora_state(model))
    assert "stack.layers.0.attn.qkv.lora.lora_a" in after and "stack.layers.1.mlp.down.lora.lora_b" in after
    n_trainable, total = trainable_parameters(model)
    assert n_trainable == sum(t.numel() for t in lora_state(model).values())
    assert total == n_trainable + sum(p.numel() for p in dict.fromkeys(base(cfg).parameters()))


def test_fused_slices_and_shapes():
    model = apply_lora(base(LLAMA), LoRAConfig(rank=2, targets=("q", "v", "gate")))
    q, kv, ff = 4 * 8, 2 * 8, 48
    qkv, up = model.stack.layers[0].attn.qkv.lora, model.stack.layers[0].mlp.up.lora
    assert qkv.slices == ((0, q), (q + kv, kv))
    assert qkv.lora_a.shape == (2 * 2, 32) and qkv.lora_b.shape == (q + kv, 2)  # one A per slice
    assert up.slices == ((0, ff),) and up.lora_b.shape == (ff, 2)
    assert qkv.scaling == 16.0 / 2
    # CrossAttention: "q" is its own Linear, "v" the second half of the fused kv
    holder = nn.Module()
    holder.xa = CrossAttention(LLAMA)
    apply_lora(holder, LoRAConfig(rank=2, targets=("q", "v")))
    assert holder.xa.q.lora.slices == ((0, q),) and holder.xa.kv.lora.slices == ((kv, kv),)


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged_and_loads_into_fresh_model(case):
    cfg, targets = CASES[case]
    model = apply_lora(base(cfg), LoRAConfig(rank=4, targets=targets))
    perturb(model)
    unmerged = model(IDS)
    assert not torch.allclose(unmerged, base(cfg)(IDS), atol=1e-3)  # the adapters do something
    merge_lora(model)
    torch.testing.assert_close(model(IDS), unmerged, atol=1e-5, rtol=0)
    fresh = base(cfg, seed=5)
    assert set(model.state_dict()) == set(fresh.state_dict())
    assert not any(m._forward_hooks for m in model.modules()) and not hasattr(model, "lora_config")
    assert all(p.requires_grad for p in model.parameters())
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(IDS), model(IDS))


def test_merge_touches_only_the_selected_rows():
    q, kv, ff = 4 * 8, 2 * 8, 48
    original = base(LLAMA)
    model = apply_lora(base(LLAMA), LoRAConfig(rank=2, targets=("q", "v", "up")))
    perturb(model)
    merge_lora(model)
    for layer, old in zip(model.stack.layers, original.stack.layers):
        new_qkv, old_qkv = layer.attn.qkv.weight, old.attn.qkv.weight
        assert torch.equal(new_qkv[q:q + kv], old_qkv[q:q + kv])  # k rows bit-identical
        assert not torch.equal(new_qkv[:q], old_qkv[:q]) and not torch.equal(new_qkv[q + kv:], old_qkv[q + kv:])
        assert torch.equal(layer.mlp.up.weight[:ff], old.mlp.up.weight[:ff])  # gate rows
        assert not torch.equal(layer.mlp.up.weight[ff:], old.mlp.up.weight[ff:])
        assert torch.equal(layer.attn.out.weight, old.attn.out.weight)
        assert torch.equal(layer.mlp.down.weight, old.mlp.down.weight)


def test_save_load_round_trip(tmp_path):
    config = LoRAConfig(rank=2, alpha=4.0, targets=("q", "k", "v", "down"), train_also=("stack.norm",))
    model = apply_lora(base(LLAMA), config)
    perturb(model)
    with torch.no_grad():
        model.stack.norm.weight.mul_(1.5)
    save_adapters(tmp_path / "adapter", model)
    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert sorted(saved) == sorted(lora_state(model))
    assert all(".lora.lora_" in n or n.startswith("stack.norm.") for n in saved)
    assert "stack.norm.weight" in saved and "stack.layers.0.attn.qkv.weight" not in saved
    assert sum(t.numel() for t in saved.values()) < 0.2 * sum(t.numel() for t in _unique_state(model).values())
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert LoRAConfig.from_dict(meta["lora"]) == config and meta["tensors"] == len(saved)

    restored = load_adapters(tmp_path / "adapter", base(LLAMA))  # applies the saved config itself
    assert restored.lora_config == config
    assert torch.equal(restored(IDS), model(IDS))
    assert torch.equal(restored.stack.norm.weight, model.stack.norm.weight)
    assert restored.stack.norm.weight.requires_grad and not restored.stack.layers[0].attn.qkv.weight.requires_grad


def test_training_changes_only_adapters():
    model = apply_lora(base(GPT2), LoRAConfig(rank=2, targets=("q", "v")))
    frozen = {k: v.clone() for k, v in _unique_state(model).items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in lora_state(model).items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        logits = model(IDS[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), IDS[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = _unique_state(model)
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(not torch.equal(state[k], v) for k, v in adapters.items())


def test_bf16_autocast_and_bf16_weights():
    model = apply_lora(base(LLAMA), LoRAConfig(rank=2, targets=("q", "v", "gate")))
    perturb(model)
    fp32 = model(IDS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(IDS)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), fp32, atol=0.1, rtol=0.05)
    mixed.float().sum().backward()
    assert model.stack.layers[0].attn.qkv.lora.lora_a.grad is not None
    half = model.to(torch.bfloat16)(IDS)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), fp32, atol=0.1, rtol=0.05)


def test_config_round_trip_and_dotted_target():
    config = LoRAConfig(rank=3, targets=["stack.layers.0.attn.qkv"], train_also=["lm_head"])
    assert LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = apply_lora(base(LLAMA), config)  # llama-tiny's head is untied
    assert list(lora_state(model)) == ["stack.layers.0.attn.qkv.lora.lora_a", "stack.layers.0.attn.qkv.lora.lora_b",
                                       "lm_head.weight"]
    assert model.stack.layers[0].attn.qkv.lora.slices == ((0, 64),)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a positive"),
    (dict(rank=2, dropout=1.0), "dropout"),
    (dict(rank=2, targets=()), "at least one target"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(AttnkitError, match=message):
        LoRAConfig(**kwargs)
    with pytest.raises(AttnkitError, match="unknown LoRA config fields"):
        LoRAConfig.from_dict({"rank": 2, "ranks": 3})


@pytest.mark.parametrize("cfg, targets, train_also, message", [
    (GPT2, ("qq",), (), "unknown LoRA target 'qq'"),
    (GPT2, ("gate",), (), "'gate' matches no module"),
    (GPT2, ("lm_head",), (), "tied"),  # a merge would change the embeddings too
    (GPT2, ("qkv", "q"), (), "twice"),
    (GPT2, ("q",), ("classifier",), "train_also 'classifier' matches no parameter"),
])
def test_bad_targets(cfg, targets, train_also, message):
    model = base(cfg)
    with pytest.raises(AttnkitError, match=message):
        apply_lora(model, LoRAConfig(rank=2, targets=targets, train_also=train_also))
    assert all(p.requires_grad for p in model.parameters())  # nothing was half-applied


def test_bad_adapter_folders(tmp_path):
    model = apply_lora(base(GPT2), LoRAConfig(rank=2))
    with pytest.raises(AttnkitError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(AttnkitError, match="no LoRA adapters"):
        save_adapters(tmp_path / "none", base(GPT2))
    with pytest.raises(AttnkitError, match="no adapter_config.json"):
        load_adapters(tmp_path / "missing", base(GPT2))
    folder = save_adapters(tmp_path / "a", model)
    with pytest.raises(AttnkitError, match="were saved with"):
        load_adapters(folder, apply_lora(base(GPT2), LoRAConfig(rank=4)))
    wider = base(GPT2.replace(d_model=64))
    with pytest.raises(AttnkitError, match="do not fit"):  # same config, other shapes
        load_adapters(folder, wider)
    assert not hasattr(wider, "lora_config") and all(p.requires_grad for p in wider.parameters())  # undone
    (folder / "adapter.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.raises(AttnkitError, match="not a readable safetensors file"):
        load_adapters(folder, base(GPT2))
    (folder / "adapter_config.json").write_text("{broken")
    with pytest.raises(AttnkitError, match="not valid JSON"):
        load_adapters(folder, base(GPT2))
