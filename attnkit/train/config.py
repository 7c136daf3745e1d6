"""What a training run is: ``TrainConfig``, named recipes (attnkit/recipes/*.yaml), and the
resolution of what the user gave (recipe, YAML file, resumed run, flags) into one config,
including the device and the precision ("auto" becomes what this device runs fast)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from attnkit.config import ModelConfig, preset, typed_settings
from attnkit.errors import AttnkitError

PRECISIONS = ("auto", "fp32", "bf16")
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# Fields that may change between a run and its resume: budgets, where it runs, how often it reports.
NOT_HASHED = ("out_dir", "max_steps", "max_time", "device", "log_interval", "eval_interval", "eval_batches",
              "sample_prompt", "sample_tokens", "name", "save_every_minutes")


TASKS = ("lm", "chat", "mlm", "classify", "qa", "seq2seq", "pixels", "audio")
LATER_FIELDS = ("task", "init", "val_data", "text_column", "label_column", "pair_column", "max_length", "truncate",
                "pooling", "length_buckets", "mask_prob", "doc_stride", "lora_rank", "lora_alpha", "lora_dropout",
                "lora_targets", "label_smoothing", "ema", "eval_sample", "seq2seq_metric", "pixel_levels", "class_conditional",
                "audio_rate", "new_head")


@dataclass
class TrainConfig:
    name: str = ""
    # what is learned (attnkit.train.tasks): next-token LM, masked LM, classification, span QA
    task: str = "lm"
    init: str | None = None  # fine-tune this checkpoint (a folder, or a named one such as minilm-l6, smollm2-135m)
    # data and tokenizer
    data: str = "shakespeare"  # a text recipe name (attnkit.data.text.RECIPES) or a path to your text
    val_data: str | None = None  # a held-out file; None: val_fraction of data (text: its last part; else seeded)
    val_fraction: float = 0.1
    tokenizer: str = "char"  # char | bpe | wordpiece | gpt2
    vocab_size: int = 8192  # bpe / wordpiece only; char and gpt2 set their own
    # labelled data (classify): the columns of the CSV / TSV / JSONL
    text_column: str = "text"
    label_column: str = "label"
    pair_column: str | None = None
    # tokens per example: encoder tasks (specials included; None: the context); a pretrained decoder's
    # training window on text (None: 512) and its longest conversation (chat; None: the context)
    max_length: int | None = None
    truncate: bool = True  # cut longer examples (counted in the log); False refuses them
    pooling: str = "cls"  # classify: the pooled [CLS] (BERT) or the mean of the tokens
    new_head: bool = False  # fine-tuning an encoder: a fresh head for the task, not the checkpoint's (other labels)
    # classify, seq2seq: draw each batch from one of this many buckets of examples of about the same
    # length (bucket chosen in proportion to its size, so every example is as likely as before): less
    # padding computed, but batches of one length; 1 (default): from all examples. On the sentiment
    # recipe 16 buckets gave 3686 train tokens/s against 2349 and 1 point less test accuracy
    # (benchmarks/results.md). On de-en (by source + target length) 32 buckets made 80% of the padded
    # positions real, not 43%, yet real tokens/s rose only 1.14x (bench_seq2seq buckets, AVX2 EPYC): the
    # encoder-decoder's blocks already compute on the real tokens only (pack_real_tokens)
    length_buckets: int = 1
    mask_prob: float = 0.15  # mlm
    doc_stride: int = 128  # qa: context tokens shared by consecutive windows of a long context
    # seq2seq: pairs (TSV/CSV/JSONL or a recipe: de-en, manpage-summary); max_length cuts sources and targets
    label_smoothing: float = 0.0
    eval_sample: int = 200  # val pairs decoded (greedy) at every evaluation for the metric
    seq2seq_metric: str = "bleu"  # bleu (with chrF): translation; rouge: summarization
    # pixels (attnkit.media): images of `data` (mnist, mnist-small or a folder), raster order
    pixel_levels: int = 256  # grey levels the pixels are quantised to (256: 8-bit, bits/dim comparable)
    class_conditional: bool = False  # the first token is the image's class
    # audio: mu-law codes of `data` (speech or a folder of WAVs) at this rate
    audio_rate: int = 8000
    # LoRA (attnkit.lora): rank 0 trains every weight
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # every projection: on the sentiment recipe 84.7% vs q,v alone 82.9% (full fine-tune 85.7%)
    lora_targets: list = field(default_factory=lambda: ["q", "k", "v", "out", "up", "down"])
    # model: a preset plus overrides (vocab_size comes from the tokenizer)
    model: str = "gpt2-char-small"
    model_overrides: dict = field(default_factory=dict)
    # optimisation
    batch_size: int = 32  # sequences per micro-step, all ranks together
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None: max_steps
    # "time": the cosine runs over max_time seconds instead of steps, so a time-budgeted run ends at
    # min_lr on any machine (the lr then depends on the clock: resume is not bit-exact)
    schedule: str = "steps"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 turns clipping off
    # evaluate and checkpoint an exponential moving average of the weights with this decay (0: off;
    # attnkit.train.loop.WeightAverage); the trained weights go on in train_state.pt for resuming
    ema: float = 0.0
    precision: str = "auto"  # auto | fp32 | bf16 (autocast, fp32 weights); a Trainer stores the resolved one
    seed: int = 1337
    # budgets and reporting
    max_steps: int = 5000
    max_time: float | None = None  # seconds of training and evaluation in this process
    save_every_minutes: float | None = None  # also write last/ this often, so a hard kill loses at most this
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    device: str = "auto"
    out_dir: str = "runs/train"
    sample_prompt: str = "\n"
    sample_tokens: int = 300  # the end-of-training sample: text tokens; audio: samples (images: 16 images, if > 0)

    def validate(self) -> "TrainConfig":
        def need(ok: bool, message: str):
            if not ok:
                raise AttnkitError(f"invalid training config: {message}")

        need(self.schedule in ("steps", "time"), f"schedule {self.schedule!r} is not 'steps' or 'time'")
        need(self.schedule == "steps" or self.max_time is not None, "schedule 'time' needs max_time (seconds)")
        need(self.precision in PRECISIONS, f"precision {self.precision!r} is not one of {PRECISIONS}")
        need(self.tokenizer in ("char", "bpe", "wordpiece", "gpt2"),
             f"tokenizer {self.tokenizer!r} is not char, bpe, wordpiece or gpt2")
        need(self.task in TASKS, f"task {self.task!r} is not one of {', '.join(TASKS)}")
        need(self.pooling in ("cls", "mean"), f"pooling {self.pooling!r} is not cls or mean")
        need(self.length_buckets >= 1, f"length_buckets must be at least 1, got {self.length_buckets}")
        need(0.0 <= self.ema < 1.0, f"ema must be in [0, 1) (0: off; 0.999 is usual), got {self.ema}")
        need(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.eval_sample >= 0, f"eval_sample must be >= 0, got {self.eval_sample}")
        need(self.seq2seq_metric in ("bleu", "rouge"), f"seq2seq_metric {self.seq2seq_metric!r} is not bleu or rouge")
        need(2 <= self.pixel_levels <= 256, f"pixel_levels must be between 2 and 256, got {self.pixel_levels}")
        need(self.audio_rate in (8000, 16000), f"audio_rate must be 8000 or 16000 Hz, got {self.audio_rate}")
        need(0.0 < self.mask_prob < 1.0, f"mask_prob must be between 0 and 1, got {self.mask_prob}")
        need(self.lora_rank >= 0, f"lora_rank must be 0 (off) or positive, got {self.lora_rank}")
        need(self.max_length is None or self.max_length >= 8, f"max_length must be at least 8, got {self.max_length}")
        need(self.device in ("auto", "cpu", "cuda"), f"device {self.device!r} is not auto, cpu or cuda")
        need(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1")
        need(self.max_steps >= 1, f"max_steps must be at least 1, got {self.max_steps}")
        need(self.max_time is None or self.max_time > 0, f"max_time must be positive seconds, got {self.max_time}")
        need(self.save_every_minutes is None or self.save_every_minutes > 0,
             f"save_every_minutes must be positive, got {self.save_every_minutes}")
        need(self.lr > 0 and self.warmup_steps >= 0, "lr must be positive and warmup_steps not negative")
        need(self.eval_interval >= 1 and self.eval_batches >= 1 and self.log_interval >= 1,
             "eval_interval, eval_batches and log_interval must be at least 1")
        need(0.0 < self.val_fraction < 1.0, f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        need(isinstance(self.model_overrides, dict), "model overrides must be a mapping of config fields")
        need(self.sample_prompt != "" or self.task != "lm" or self.sample_tokens == 0,  # the sample continues it
             "sample_prompt is empty; give it some text to continue, or sample_tokens: 0 for no sample")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Flat fields, or the recipe layout: ``model: {preset: NAME, field: value}``,
        ``tokenizer: {kind: bpe, vocab_size: N}`` and a ``train:`` section of flat fields."""
        if not isinstance(data, dict):
            raise AttnkitError("a training config must be a mapping of settings; see attnkit/recipes/*.yaml")
        data = dict(data)
        data.update(data.pop("train", None) or {})
        model = data.get("model")
        if isinstance(model, dict):
            model = dict(model)
            if "preset" not in model:
                raise AttnkitError("the model section needs `preset: NAME` (e.g. gpt2-char-small)")
            data["model"] = model.pop("preset")
            data["model_overrides"] = {**model, **(data.get("model_overrides") or {})}
        tok = data.get("tokenizer")
        if isinstance(tok, dict):
            unknown = sorted(set(tok) - {"kind", "vocab_size"})
            if unknown:
                raise AttnkitError(f"unknown tokenizer settings {unknown}; remove them or check the spelling "
                                   f"(known: kind, vocab_size)")
            if "kind" not in tok:
                raise AttnkitError("the tokenizer section needs `kind: char|bpe|wordpiece|gpt2`")
            data["tokenizer"] = tok["kind"]
            if "vocab_size" in tok:
                data["vocab_size"] = tok["vocab_size"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AttnkitError(f"unknown training settings {unknown}; remove them or check the spelling "
                               f"(known: {', '.join(sorted(known))})")
        data = typed_settings(cls, data, "training setting")
        if isinstance(data.get("model_overrides"), dict):
            data["model_overrides"] = typed_settings(ModelConfig, data["model_overrides"], "model setting")
        try:
            return cls(**data).validate()
        except TypeError as e:
            raise AttnkitError(f"invalid training config ({e}); check the settings") from None

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes).validate()

    def config_hash(self) -> str:
        """What makes two runs the same run (resume refuses a different one). Fields added after
        runs existed count only when set, so those runs still resume."""
        defaults = TrainConfig()
        kept = {k: v for k, v in self.to_dict().items()
                if k not in NOT_HASHED and not (k in LATER_FIELDS and v == getattr(defaults, k))}
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def changed_from(self, other: "TrainConfig") -> list[str]:
        """The hashed fields in which ``other`` differs from this config."""
        return [k for k, v in self.to_dict().items() if k not in NOT_HASHED and v != getattr(other, k)]


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_config_file(path: str | os.PathLike) -> TrainConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise AttnkitError(f"config file {path} does not exist; pass a YAML file like attnkit/recipes/*.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise AttnkitError(f"{path} is not valid YAML{at}; fix the file") from None
    except UnicodeDecodeError:
        raise AttnkitError(f"{path} is not UTF-8 text; save it as UTF-8 YAML") from None
    cfg = TrainConfig.from_dict(data or {})
    return cfg if cfg.name else cfg.replace(name=path.stem)


def load_recipe(name: str) -> TrainConfig:
    if not (RECIPES_DIR / f"{name}.yaml").is_file():
        raise AttnkitError(f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())}")
    return load_config_file(RECIPES_DIR / f"{name}.yaml")


# --- where and in which precision it runs -----------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise AttnkitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 autocast where the device has fast bf16 matmuls (a CUDA GPU with bf16, a CPU
    with AVX512: measured ~1.9x faster at the same loss), else fp32; "fp32"/"bf16" stay as given."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        fast = "AVX512" in torch.backends.cpu.get_cpu_capability()
    else:
        fast = False
    return "bf16" if fast else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast (weights stay fp32), or a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# --- from the command line ------------------------------------------------------------------------

def resolve_config(*, recipe: str | None = None, config_file: str | None = None, resume: bool = False,
                   out: str | None = None, model_overrides: dict | None = None, **overrides) -> TrainConfig:
    """The run's config: a recipe, a YAML file, the stored config of the run being resumed, or the
    defaults for the user's --data; then the flags that were given (None = not given)."""
    from attnkit.config import PRESETS
    from attnkit.train.run_folder import STATE_FILE, read_train_state

    if recipe and config_file:
        raise AttnkitError("give either --recipe or --config, not both")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    stored = False  # the config of the run being resumed: its model was made already
    if recipe:
        cfg = load_recipe(recipe)
    elif config_file:
        cfg = load_config_file(config_file)
    elif resume and out and (Path(out) / "last" / STATE_FILE).is_file():
        cfg = TrainConfig.from_dict(json.loads(read_train_state(Path(out) / "last")["train_config"]))
        stored = True
    elif "data" in overrides:
        cfg = TrainConfig(name=Path(overrides["data"]).stem or "train", data=overrides["data"])
        if overrides.get("task") == "seq2seq":  # an encoder-decoder and one BPE for both sides unless given
            cfg = cfg.replace(model="transformer-small", tokenizer="bpe", vocab_size=8000, lr=1e-3, warmup_steps=400,
                              batch_size=64, label_smoothing=0.1, beta2=0.98, weight_decay=0.01, max_steps=4000,
                              eval_interval=500, log_interval=50, model_overrides={"context_length": 128})
        elif overrides.get("task") in ("pixels", "audio"):  # a small transformer over pixels / mu-law codes
            model = "imagegpt-small" if overrides["task"] == "pixels" else "audio-small"
            cfg = cfg.replace(model=model, batch_size=16, lr=2e-3, min_lr=1e-4, warmup_steps=100, precision="auto",
                              max_steps=2000, eval_interval=250, eval_batches=16,
                              sample_tokens=8000 if overrides["task"] == "audio" else cfg.sample_tokens)
        elif overrides.get("task", "lm") in ("lm", "chat") and "init" in overrides:  # fine-tuning a pretrained decoder
            lora = bool(overrides.get("lora_rank"))
            cfg = cfg.replace(lr=5e-4 if lora else 5e-5, weight_decay=0.0 if lora else 0.1, batch_size=8,
                              max_steps=1000, warmup_steps=20, eval_interval=100, eval_batches=10, sample_tokens=100)
        elif overrides.get("task", "lm") != "lm":  # an encoder task: an encoder preset and WordPiece unless given
            cfg = cfg.replace(model="bert-tiny", tokenizer="wordpiece", lr=1e-4 if "init" in overrides else 5e-4,
                              max_steps=1000, warmup_steps=50, eval_interval=100)
    elif resume and out:
        raise AttnkitError(f"{out} holds no run to resume (no last/{STATE_FILE}); check --out, or drop --resume to "
                           "start one")
    else:
        raise AttnkitError("nothing to train on; give --recipe NAME, --config FILE.yaml or --data PATH")
    cfg = cfg.replace(**overrides)
    extra = {k: v for k, v in (model_overrides or {}).items() if v is not None}
    if extra:
        cfg = cfg.replace(model_overrides={**cfg.model_overrides, **extra})
    if out:
        cfg = cfg.replace(out_dir=out)
    elif not recipe and not config_file and cfg.out_dir == TrainConfig.out_dir:
        cfg = cfg.replace(out_dir=f"runs/{cfg.name or 'train'}")
    elif recipe or config_file:
        cfg = cfg.replace(out_dir=cfg.out_dir if cfg.out_dir != TrainConfig.out_dir else f"runs/{cfg.name}")
    if cfg.model not in PRESETS:
        raise AttnkitError(f"unknown model preset {cfg.model!r}; choose one of {', '.join(PRESETS)}")
    model = preset(cfg.model, **cfg.model_overrides)  # model settings fail here, before any data is read
    if cfg.model_overrides.get("window") is not None and model.attention != "sliding" and not stored:
        raise AttnkitError(f"--window sets the size of a sliding window, but the model's attention is "
                           f"{model.attention}; add --attention sliding or drop --window")
    if model.attention == "sliding" and model.positional == "learned" and "positional" not in cfg.model_overrides:
        # learned positions stop at the context; a sliding window is for going past it
        cfg = cfg.replace(model_overrides={**cfg.model_overrides, "positional": "rope"})
    return cfg.replace(precision=resolve_precision(cfg.precision, resolve_device(cfg.device)))
