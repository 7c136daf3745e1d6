"""LoRA (Hu et al. 2021): train a low-rank update B @ A * (alpha / rank) next to frozen weights.

Adapters sit on the model's existing ``Linear`` modules; nothing is replaced or renamed. Each
adapted Linear gets a child ``lora`` (a ``LoRALinear``) and a forward hook that adds its update to
the Linear's output, so base weights keep their names (``stack.layers.0.attn.qkv.weight``) and
adapters get their own (``stack.layers.0.attn.qkv.lora.lora_a`` / ``.lora_b``).

Fused projections (litgpt's ``LoRAQKVLinear``): one adapter knows which output rows of a fused
weight it adapts. Targets "q" and "v" on SelfAttention's ``qkv`` [q | k | v] are one ``LoRALinear``
with one rank-r A per slice; its update lands in the q and v rows only, and ``merge_lora`` adds the
product into exactly those rows, so the k rows stay bit-identical and the import/export name tables
(``attnkit.hf``) never see LoRA.

Targets: "q", "k", "v" (slices of ``attn.qkv``; on CrossAttention "q" is ``q`` and "k", "v" are
slices of ``kv``), "qkv" (the whole fused projection(s), one adapter each), "out", "gate" and "up"
(slices of a SwiGLU ``mlp.up`` [gate | up]; otherwise "up" is the whole ``mlp.up``), "down", or the
dotted name (or a dotted suffix of it) of any other Linear, e.g. "stack.layers.0.attn.qkv".
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from attnkit.checkpoints import atomic_directory
from attnkit.errors import AttnkitError
from attnkit.kernels import Dropout
from attnkit.layers import MLP, CrossAttention, SelfAttention

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
FORMAT = "attnkit-lora"
NAMED_TARGETS = ("q", "k", "v", "qkv", "out", "gate", "up", "down")
NAMED_TARGETS_EVERY = ("q", "k", "v", "out", "gate", "up", "down")  # every projection, each once


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # scaling = alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    targets: tuple[str, ...] = ("q", "v")
    train_also: tuple[str, ...] = ()  # parameter-name prefixes that train in full (a classifier "head")

    def __post_init__(self):
        self.targets, self.train_also = tuple(self.targets), tuple(self.train_also)
        self.validate()

    def validate(self) -> "LoRAConfig":
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise AttnkitError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise AttnkitError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise AttnkitError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise AttnkitError(f"LoRA needs at least one target; use some of {', '.join(NAMED_TARGETS)}")
        for name in self.targets + self.train_also:
            if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
                raise AttnkitError(f"LoRA target / train_also entry {name!r} is not a module name")
        return self

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets), "train_also": list(self.train_also)}

    @classmethod
    def from_dict(cls, data: dict) -> "LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AttnkitError(f"unknown LoRA config fields {unknown}; remove them or check the spelling")
        return cls(**data)


class LoRALinear(nn.Module):
    """The update for some output rows of one base Linear (its parent module; not a child here).

    slices: ((start, width), ...) rows of the base output it adapts, in order.
    lora_a (n_slices * r, in): slice i uses rows [i*r, (i+1)*r); kaiming-uniform, as in the paper / peft.
    lora_b (sum(widths), r): slice i uses its own block of rows; zeros, so the model starts unchanged.
    """

    def __init__(self, base: nn.Linear, slices: tuple[tuple[int, int], ...], rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__()
        self.slices, self.rank, self.scaling = tuple(slices), rank, alpha / rank
        w = base.weight
        a = torch.empty(len(self.slices) * rank, base.in_features, device=w.device, dtype=torch.float32)
        for i in range(len(self.slices)):
            nn.init.kaiming_uniform_(a[i * rank:(i + 1) * rank], a=math.sqrt(5))
        self.lora_a = nn.Parameter(a.to(w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(sum(n for _, n in self.slices), rank, device=w.device, dtype=w.dtype))
        self.drop = Dropout(dropout)
        rows = torch.cat([torch.arange(s, s + n) for s, n in self.slices])  # (sum(widths),) base rows
        self.register_buffer("rows", rows.to(w.device), persistent=False)

    def _blocks(self):
        """(A_i (r, in), B_i (width_i, r)) per slice."""
        offset = 0
        for i, (_, width) in enumerate(self.slices):
            yield self.lora_a[i * self.rank:(i + 1) * self.rank], self.lora_b[offset:offset + width]
            offset += width

    def forward(self, x: Tensor, out: Tensor) -> Tensor:
        """x (..., in), the base output (..., out) -> the base output plus the update in its rows."""
        h = self.drop(x)
        delta = torch.cat([F.linear(F.linear(h, a), b) for a, b in self._blocks()], dim=-1)  # (..., sum(widths))
        return out.index_add(-1, self.rows, (delta * self.scaling).to(out.dtype))

    def delta_weight(self) -> Tensor:
        """(sum(widths), in) fp32: the update of the adapted rows of the base weight."""
        return torch.cat([b.float() @ a.float() for a, b in self._blocks()]) * self.scaling

    def extra_repr(self) -> str:
        return f"slices={self.slices}, rank={self.rank}, scaling={self.scaling:g}"


def _lora_hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    return module.lora(args[0], out)


def _fused_slices(model: nn.Module, target: str) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """(Linear's name, row slices) for a named target, from the module types that fuse projections."""
    found = []
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, SelfAttention):
            q, kv = m.n_head * m.head_dim, m.n_kv_head * m.head_dim
            spans = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "qkv": (0, q + 2 * kv)}
            if target in spans:
                found.append((pre + "qkv", (spans[target],)))
        elif isinstance(m, CrossAttention):
            kv = m.n_kv_head * m.head_dim
            if target in ("q", "qkv"):
                found.append((pre + "q", ((0, m.q.out_features),)))
            if target in ("k", "v", "qkv"):
                found.append((pre + "kv", {"k": ((0, kv),), "v": ((kv, kv),), "qkv": ((0, 2 * kv),)}[target]))
        elif isinstance(m, MLP):
            width = m.up.out_features
            if m.kind == "swiglu" and target in ("gate", "up"):
                found.append((pre + "up", ((0, width // 2),) if target == "gate" else ((width // 2, width // 2),)))
            elif target == "up":
                found.append((pre + "up", ((0, width),)))
            elif target == "down":
                found.append((pre + "down", ((0, m.down.out_features),)))
        if target == "out" and isinstance(m, (SelfAttention, CrossAttention)):
            found.append((pre + "out", ((0, m.out.out_features),)))
    return found


def present_targets(model: nn.Module, targets=NAMED_TARGETS_EVERY) -> tuple[str, ...]:
    """The named targets that match a module of ``model`` (every projection it has, by default: "gate" only
    where the MLP is SwiGLU)."""
    return tuple(t for t in targets if _fused_slices(model, t))


def _plan(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[tuple[int, int], ...]]:
    """Linear name -> the sorted row slices to adapt, for every target; errors name the bad target."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan: dict[str, list[tuple[int, int]]] = {}
    for target in config.targets:
        if target in NAMED_TARGETS:
            found = _fused_slices(model, target)
            if not found:
                raise AttnkitError(f"LoRA target {target!r} matches no module of this {type(model).__name__}; "
                                   "drop it from targets")
        else:
            found = [(n, ((0, m.out_features),)) for n, m in linears.items() if n == target or n.endswith("." + target)]
            if not found:
                raise AttnkitError(
                    f"unknown LoRA target {target!r}: use {', '.join(NAMED_TARGETS)} or the dotted name of a "
                    "Linear such as 'stack.layers.0.attn.qkv'")
        for name, slices in found:
            plan.setdefault(name, []).extend(slices)
    shared = _shared_weights(model)
    for name, slices in plan.items():
        slices.sort()
        for (s0, n0), (s1, _) in zip(slices, slices[1:]):
            if s1 < s0 + n0:
                raise AttnkitError(f"LoRA targets {list(config.targets)} adapt the rows of {name} twice; "
                                   "use either 'qkv' or its parts")
        if linears[name].weight.data_ptr() in shared:
            raise AttnkitError(f"{name}'s weight is tied to another module's, which a merge would change too; "
                               "LoRA cannot target it")
    return {name: tuple(slices) for name, slices in plan.items()}


def _shared_weights(model: nn.Module) -> set[int]:
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[p.data_ptr()] = count.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in count.items() if n > 1}


def _adapted(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(getattr(m, "lora", None), LoRALinear)}


def _train_also_params(model: nn.Module, prefixes) -> dict[str, nn.Parameter]:
    params, seen = {}, set()
    for prefix in prefixes:
        hits = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)
                if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            raise AttnkitError(f"LoRA train_also {prefix!r} matches no parameter of this {type(model).__name__}; "
                               "name a module such as 'head'")
        for n, p in hits:
            if id(p) not in seen:
                seen.add(id(p))
                params[n] = p
    return params


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze the model, add adapters for ``config.targets``, train only them (and ``train_also``). In place."""
    config.validate()
    if getattr(model, "lora_config", None) is not None or _adapted(model):
        raise AttnkitError("this model already has LoRA adapters; merge_lora it (or build a fresh one) first")
    plan = _plan(model, config)
    also = _train_also_params(model, config.train_also)
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name, slices in plan.items():
        linear = modules[name]
        linear.lora = LoRALinear(linear, slices, config.rank, config.alpha, config.dropout)
        linear.lora.train(linear.training)
        linear.register_forward_hook(_lora_hook)
    for p in also.values():
        p.requires_grad_(True)
    model.lora_config = config
    return model


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors LoRA trains: every adapter's lora_a / lora_b and the ``train_also`` parameters."""
    config = _config_of(model)
    state = {n: p for n, p in model.named_parameters() if ".lora.lora_" in f".{n}"}
    state.update(_train_also_params(model, config.train_also))
    return {n: t.detach() for n, t in state.items()}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _config_of(model: nn.Module) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if config is None:
        raise AttnkitError("this model has no LoRA adapters; apply_lora (or load_adapters) first")
    return config


def save_adapters(directory, model: nn.Module) -> Path:
    """Write adapter.safetensors (only lora_state) + adapter_config.json to ``directory``, atomically."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_adapters(tmp, model)
    return directory


def write_adapters(folder: Path, model: nn.Module) -> None:
    """save_adapters' two files, into an existing folder that the caller writes atomically."""
    config, state = _config_of(model), lora_state(model)
    meta = {"format": FORMAT, "version": 1, "lora": config.to_dict(),
            "modules": sorted(_adapted(model)), "tensors": len(state),
            "parameters": sum(t.numel() for t in state.values())}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
    save_file({n: t.contiguous() for n, t in state.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter_config(directory) -> LoRAConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AttnkitError(f"{directory} has no {ADAPTER_CONFIG}; point at a folder written by save_adapters")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttnkitError(f"{path} is not valid JSON ({e}); save the adapters again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("lora"), dict):
        raise AttnkitError(f"{path} is not an attnkit LoRA adapter config; point at a folder written by save_adapters")
    try:
        return LoRAConfig.from_dict(meta["lora"])
    except TypeError as e:
        raise AttnkitError(f"{path} holds a malformed LoRA config ({e}); save the adapters again") from e


def load_adapters(directory, model: nn.Module) -> nn.Module:
    """Load saved adapters into ``model`` (applying their LoRAConfig first if it has none). In place."""
    directory = Path(directory)
    saved = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AttnkitError(f"{directory} has no {ADAPTER_WEIGHTS}; the adapter folder is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AttnkitError(f"{weights} is not a readable safetensors file ({e}); save the adapters again") from e
    current = getattr(model, "lora_config", None)
    if current is None:
        apply_lora(model, saved)
        try:
            return _copy_adapters(directory, model, state)
        except AttnkitError:
            merge_lora(model)  # B is still zero: the weights come back as they were
            raise
    if current != saved:
        raise AttnkitError(f"the adapters in {directory} were saved with {saved} but the model has {current}; "
                           "load them into a model without adapters")
    return _copy_adapters(directory, model, state)


def _copy_adapters(directory, model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    expected = lora_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{n} {tuple(state[n].shape)} != {tuple(t.shape)}" for n, t in expected.items()
             if n in state and state[n].shape != t.shape]
    problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []) + \
               ([f"wrong shapes {'; '.join(wrong[:5])}"] if wrong else [])
    if problems:
        raise AttnkitError(f"the adapters in {directory} do not fit this model: {'; '.join(problems)}")
    with torch.no_grad():
        for n, t in expected.items():
            t.copy_(state[n])
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Add every adapter's B @ A * scaling into its rows of the base weight and remove the adapters.
    The model is a plain one again: the same state-dict keys as a fresh model of its config. In place."""
    _config_of(model)
    with torch.no_grad():
        for linear in _adapted(model).values():
            adapter = linear.lora
            w = linear.weight
            merged = w.index_select(0, adapter.rows).float() + adapter.delta_weight()  # (sum(widths), in)
            w.index_copy_(0, adapter.rows, merged.to(w.dtype))
            for key in [k for k, hook in linear._forward_hooks.items() if hook is _lora_hook]:
                del linear._forward_hooks[key]
            del linear.lora
    flags = getattr(model, "_lora_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    del model.lora_config
    if hasattr(model, "_lora_requires_grad"):
        del model._lora_requires_grad
    return model
