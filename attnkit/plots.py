"""Pictures: loss curves of a run and attention maps of a prompt (matplotlib, Agg, PNG)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from attnkit.errors import AttnkitError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write atomically so a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def plot_loss_curve(history: list[dict], path: Path, title: str = "") -> Path | None:
    """Train loss (every logged step) and val loss (every eval) against step."""
    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("kind") == "eval"]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
    return Path(path)


def token_label(text: str) -> str:
    """Make whitespace visible on an axis."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


@torch.no_grad()
def _head_grids(maps, query_labels: list[str], key_labels: list[str], out: Path, stem: str, title: str,
                query_axis: str = "query", key_axis: str = "key") -> list[Path]:
    """One PNG per layer (``<stem>_<i>.png``): the heads as a grid of (query x key) heatmaps."""
    plt = _pyplot()
    H = maps[0].shape[1]
    cols = math.ceil(math.sqrt(H))
    rows = math.ceil(H / cols)
    longest = max(len(query_labels), len(key_labels))
    size = max(2.5, 0.12 * longest + 1.0)
    font = max(4, min(9, 300 // max(1, longest)))
    paths = []
    for layer, weights in enumerate(maps):
        fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), dpi=100, squeeze=False)
        for h, ax in enumerate(axes.flat):
            if h >= H:
                ax.axis("off")
                continue
            ax.imshow(weights[0, h].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"head {h}", fontsize=9)
            ax.set_xticks(range(len(key_labels)), key_labels, fontsize=font, rotation=90)
            ax.set_yticks(range(len(query_labels)), query_labels, fontsize=font)
            ax.set_xlabel(key_axis, fontsize=8)
            ax.set_ylabel(query_axis, fontsize=8)
        fig.suptitle(f"layer {layer}: {title[:60]!r}", fontsize=10)
        fig.tight_layout()
        paths.append(_save(fig, out / f"{stem}_{layer}.png"))
        plt.close(fig)
    return paths


def _out_dir(out_dir) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AttnkitError(f"cannot write to {out} ({e.strerror}); choose a writable --out") from None
    return out


def _check_length(what: str, n: int, limit: int) -> None:
    if n > limit:
        raise AttnkitError(f"the {what} is {n} tokens; attention maps are drawn for at most {limit}, so shorten it")


def attention_weights(model, tokenizer, text: str, max_tokens: int = 96,
                      what: str = "prompt") -> tuple[list[int], list[Tensor]]:
    """A decoder's or an encoder's attention over ``text``: (token ids, one (1, H, T, T) map per layer),
    computed by the model itself (``need_weights``) over the ids it sees in use: an encoder's are
    [CLS] text [SEP], as embed / classify give them. For `attnkit attend` and the playground of `attnkit serve`."""
    if not tokenizer.encode(text):
        raise AttnkitError(f"the {what} encodes to no tokens; give some text")
    device = next(model.parameters()).device
    extra = {}
    if model.cfg.family == "encoder":
        from attnkit.data.encoder_inputs import EncoderInputs

        ids, types = EncoderInputs(tokenizer, sys.maxsize, truncate=False).ids(text)  # uncut: checked below
        extra["token_types"] = torch.tensor([types], device=device)
    else:
        ids = tokenizer.encode(text)
    _check_length(what, len(ids), min(max_tokens, model.cfg.context_length))
    with torch.inference_mode():
        _, maps = model.eval()(torch.tensor([ids], device=device), need_weights=True, **extra)
    return ids, maps


def plot_attention(model, tokenizer, prompt: str, out_dir, max_tokens: int = 96) -> list[Path]:
    """One PNG per layer (``layer_<i>.png``): the heads as a grid of (query x key) heatmaps."""
    if not tokenizer.encode(prompt):
        raise AttnkitError("the prompt encodes to no tokens; give some text with -p")
    ids, maps = attention_weights(model, tokenizer, prompt, max_tokens)  # (1, H, T, T) per layer
    out = _out_dir(out_dir)
    labels = [token_label(tokenizer.decode([i])) for i in ids]
    return _head_grids(maps, labels, labels, out, "layer", prompt)


def plot_seq2seq_attention(model, tokenizer, source: str, target: str | Sequence[int], out_dir,
                           max_tokens: int = 96) -> list[Path]:
    """An encoder-decoder's maps: ``encoder_<i>.png`` (source x source), ``decoder_<i>.png``
    (target x target) and ``cross_<i>.png`` (target on the vertical axis, source on the horizontal).
    ``target``: a text, or the ids of one (the model's own output, as `seq2seq_tokens` gives them)."""
    from attnkit.generate import source_ids

    limit = min(max_tokens, model.cfg.context_length)
    if not tokenizer.encode(source):
        raise AttnkitError("the source encodes to no tokens; give some text with -p")
    _check_length("source", len(tokenizer.encode(source)) + 1, limit)  # + its end token, uncut
    src, _ = source_ids(model, tokenizer, source)
    target_ids = tokenizer.encode(target) if isinstance(target, str) else list(target)
    tgt = [model.decoder_start_id] + target_ids
    _check_length("target", len(tgt), limit)
    out = _out_dir(out_dir)
    device = next(model.parameters()).device
    _, maps = model.eval()(torch.tensor([src], device=device), None, torch.tensor([tgt], device=device),
                           need_weights=True)
    src_labels = [token_label(tokenizer.decode([i])) for i in src]
    tgt_labels = [token_label(tokenizer.decode([i])) for i in tgt]
    target_text = target if isinstance(target, str) else tokenizer.decode(target_ids).strip()
    return (_head_grids(maps["encoder"], src_labels, src_labels, out, "encoder", source)
            + _head_grids(maps["decoder"], tgt_labels, tgt_labels, out, "decoder", target_text)
            + _head_grids(maps["cross"], tgt_labels, src_labels, out, "cross", f"{source} -> {target_text}",
                          query_axis="target", key_axis="source"))


def plot_confusion(matrix: list[list[int]], labels: list[str], path, title: str = "") -> Path:
    """A confusion-matrix heatmap (rows gold, columns predicted) with the count in every cell."""
    n = len(labels)
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"the confusion matrix must be {n} x {n} for {n} labels")
    plt = _pyplot()
    size = max(3.5, 0.6 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), dpi=110)
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    peak = max((v for row in matrix for v in row), default=0)
    font = max(5, min(10, 120 // max(1, n)))
    for g, row in enumerate(matrix):
        for p, count in enumerate(row):
            ax.text(p, g, str(count), ha="center", va="center", fontsize=font,
                    color="white" if peak and count > peak / 2 else "black")
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
    return Path(path)
