"""Typed run configuration: YAML file + dotted command-line overrides.

Precedence: command line (`key=value`) > YAML file (`--config`) > the defaults below.
Every field has a docstring; these key names are the public interface used by docs and configs.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from parallel.dims import ConfigError  # defined there so parallel/ needn't import trainer/
from trainer.ds_config import ENGINES, OFFLOAD_DEVICES, validate_engine


@dataclass
class ModelConfig:
    path: str | None = None
    """HF hub id or local directory, loaded with `from_pretrained`. Exclusive with `model.config`."""
    config: dict[str, Any] | None = None
    """Inline HF config fields (must include `model_type`: llama | qwen2 | mistral) for a randomly initialised model."""
    dtype: str = "float32"
    """Parameter/compute dtype: float32 | bfloat16."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; defaults to `model.path`."""
    attn_kernel: str = "auto"
    """Local attention kernel under CP: auto | cudnn | flash | flash_attn | flex | cpu_flash | math."""


@dataclass
class DataConfig:
    path: str = "configs/demo/corpus.jsonl"
    """Local jsonl/json/parquet/txt file or directory, or a hub dataset name."""
    text_field: str = "text"
    """Column holding raw text (format: text)."""
    format: str = "auto"
    """auto | text | chat | tokens. auto: `input_ids` column -> tokens, `messages` column -> chat, else text."""
    messages_field: str = "messages"
    """Column holding chat messages (format: chat), rendered with the tokenizer's chat template."""
    train_on_prompt: bool = False
    """Chat format: also train on prompt (non-assistant) tokens instead of masking them with -100."""
    split: str = "train"
    """Dataset split to read."""
    streaming: bool = False
    """Stream the dataset (corpora larger than RAM) instead of tokenising it up front."""
    num_proc: int = 1
    """Worker processes for tokenisation."""
    cache_dir: str | None = None
    """Tokenised-data cache; default `~/.cache/longctx` (or $LONGCTX_CACHE)."""
    doc_mask: bool = True
    """Packed documents never attend across boundaries; position ids restart per document."""
    shuffle: bool = True
    """Shuffle packed sequences each epoch (seeded by training.seed)."""
    add_bos: bool = True
    """Prepend the tokenizer's BOS token to each text document (if it has one)."""
    add_eos: bool = True
    """Append the tokenizer's EOS token to each text document (if it has one)."""
    max_doc_tokens: int | None = None
    """Documents longer than this are truncated (truncate: true) or rejected; None = no limit (split across sequences)."""
    truncate: bool = True
    """With max_doc_tokens: truncate long documents instead of raising."""
    on_bad_row: str = "error"
    """error | skip: what to do with a malformed row (missing field, non-text value)."""
    cache_wait_s: float = 86400.0
    """Ranks other than 0 wait this long (a file wait, not a collective) for rank 0 to write the token cache."""
    shuffle_buffer: int = 10000
    """Streaming only: documents held in the seeded shuffle buffer (data.shuffle)."""


@dataclass
class ParallelConfig:
    dp: int = -1
    """Data-parallel degree; -1 = infer from world size / (tp * pp * cp)."""
    dp_replicate: int = 1
    """HSDP: replicate groups inside dp (dp = dp_replicate * shard); 1 = plain FSDP over dp * cp."""
    tp: int = 1
    """Tensor-parallel degree (heads and kv heads must divide)."""
    pp: int = 1
    """Pipeline-parallel degree (<= number of layers)."""
    cp: int = 1
    """Context-parallel degree: the sequence is split over this many ranks."""
    cp_strategy: str = "ring"
    """ring | ulysses | hybrid (ulysses inside, ring across) | auto (the planner picks strategy, ulysses degree and layout for the given cp)."""
    auto: bool = False
    """Use the planner's best layout for the whole mesh (dp, tp, pp, cp, CP strategy, layout); see `train.py --plan`."""
    ulysses: int = 1
    """Ulysses degree inside hybrid (cp = ulysses * ring)."""
    cp_layout: str = "zigzag"
    """zigzag (causal load balance) | contiguous."""
    sequence_parallel: bool = False
    """TP: shard norms/residual activations over the sequence too."""
    pp_schedule: str = "1F1B"
    """Pipeline schedule: 1F1B | GPipe."""
    pp_microbatches: int | None = None
    """Microbatches per pipeline step; default = pp."""
    activation_checkpointing: str = "none"
    """none | full | selective (every other layer) | full_keep_attn (full, but attention outputs are kept, not recomputed)."""
    activation_offload: bool = False
    """Offload saved activations to pinned CPU memory."""
    mlp_chunks: int = 1
    """Tile each MLP over the sequence in this many chunks (recomputed in backward) to cut its activation peak."""
    compile: bool = False
    """torch.compile each decoder layer."""
    fsdp_cpu_offload: bool = False
    """FSDP2 CPU offload of parameters, gradients and optimizer state."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2)."""
    engine: str = "fsdp2"
    """fsdp2 (composes with TP/PP, DCP checkpoints) | deepspeed (ZeRO-1/2/3 + CPU offload over dp x cp; see the deepspeed section and docs/engines.md)."""
    gpus_per_node: int = 8
    """Planner: GPUs per node; groups within a node (innermost first: tp, ulysses, ring, dp, pp) get NVLink rates."""
    device_memory_gib: float | None = None
    """Planner: GPU memory a layout must fit in (GiB); None = the calibration's (80 for H100)."""
    plan_calibration: str | None = None
    """Planner: device-rate JSON (`python -m parallel.planner.calibrate --out f.json`); None = built-in H100 rates."""


@dataclass
class TrainingConfig:
    seq_len: int = 1024
    """Tokens per sequence (the full sequence, before CP sharding)."""
    micro_batch_size: int = 1
    """Sequences per dp rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    steps: int = 100
    """Optimizer steps to run."""
    seed: int = 0
    """Seed for init, data order and dropout."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold on the global L2 norm; 0 disables clipping."""
    skip_nonfinite: int = 0
    """Skip up to this many steps whose loss or grad norm is NaN/inf before stopping."""
    loss_chunk: int = 4096
    """Tokens per chunk of the LM head + cross-entropy (full logits never materialise)."""
    expandable_segments: bool = True
    """CUDA allocator expandable segments (less fragmentation at long context); ignored on CPU."""
    device: str = "auto"
    """auto | cpu | cuda."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    scheduler: str = "cosine"
    """constant | linear | cosine (decay after warm-up to min_lr_ratio * lr)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every N steps (0 = only at the end)."""
    keep: int = 3
    """Keep the newest k checkpoints (0 = keep all)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any) | none | <path to a checkpoint dir>."""
    async_save: bool = False
    """Write checkpoints in the background (DCP async_save)."""
    export_hf: bool = True
    """Export the final model as HF safetensors to <output_dir>/hf."""
    export_dtype: str = "bfloat16"
    """dtype of the HF export: float32 | bfloat16."""


@dataclass
class LoggingConfig:
    every: int = 1
    """Log every N steps."""
    wandb: bool = False
    """Log to Weights & Biases (WANDB_PROJECT / WANDB_ENTITY / WANDB_MODE / WANDB_RUN_ID honoured)."""
    progress: bool = True
    """Progress bar with ETA on rank 0."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    """parallel.engine=deepspeed: ZeRO stage 1 (optimizer states) | 2 (+ gradients) | 3 (+ parameters), partitioned over dp x cp."""
    offload_optimizer: str = "none"
    """none | cpu: keep optimizer states (and the fp32 master weights) in CPU memory and step them there (ZeRO-Offload)."""
    offload_params: str = "none"
    """none | cpu: keep parameter partitions in CPU memory between uses (ZeRO-Infinity style; needs zero_stage 3)."""
    cpu_adam: bool = True
    """With offload_optimizer=cpu: step with DeepSpeedCPUAdam (vectorised C++, JIT-built on first use) instead of torch AdamW; same AdamW math."""
    config: str | None = None
    """Path to a ds_config JSON merged with the derived values (micro batch, grad accumulation, clipping, precision, stage, offload); "auto" takes longctx's value, a different value is an error."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output_dir: str = "outputs/run"
    """Everything a run writes goes under this directory."""


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML -> raw dict -> dotted overrides -> typed dataclasses -> validate().
# Overrides are applied to the raw dict before typing, so CLI > YAML > defaults falls out of the order.


def load_config(path: str | None, overrides: list[str]) -> Config:
    """Build the run config from an optional YAML file and `key=value` overrides, then validate it."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(path)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "expected a key=value override (e.g. training.steps=10)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(key, f"cannot parse value {text!r}: {_one_line(exc)}") from None
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(path, "config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "unknown line"
        problem = getattr(exc, "problem", None) or _one_line(exc)
        raise ConfigError(path, f"invalid YAML at {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_free_dict(tp: Any) -> bool:
    args = typing.get_args(tp) if _is_union(tp) else (tp,)
    return any(typing.get_origin(a) is dict or a is dict for a in args)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _unknown(key: str) -> ConfigError:
    valid = [k for k, *_ in _walk_fields(Config, "")]
    valid += sorted({k.split(".")[0] for k in valid if "." in k})  # section names
    leaf = key.rsplit(".", 1)[-1]
    # A known leaf under the wrong section ("training.cp") is the likeliest slip; then plain typos.
    guess = [k for k in valid if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {guess[0]}?)" if guess else ""
    return ConfigError(key, f"unknown key{hint}")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c=value` in the raw dict, checking the path against the schema as it goes."""
    parts = key.split(".")
    cls: Any = Config
    node = raw
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        hints = _hints(cls)
        if part not in hints:
            raise _unknown(key)
        tp = hints[part]
        last = i == len(parts) - 1
        if last:
            node[part] = value
            return
        if _is_section(tp):
            child = node.get(part)
            node[part] = child = child if isinstance(child, dict) else {}
            node, cls = child, tp
        elif _is_free_dict(tp):
            # A free dict (model.config): any sub-key goes, nested dicts created as needed.
            child = node.get(part)
            node[part] = node = child if isinstance(child, dict) else {}
            for sub in parts[i + 1 : -1]:
                nxt = node.get(sub)
                node[sub] = node = nxt if isinstance(nxt, dict) else {}
            node[parts[-1]] = value
            return
        else:
            raise ConfigError(here, f"is a value, not a section (cannot set {key})")


def _build(cls: Any, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a section (mapping), got {raw!r}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            raise _unknown(str(key))
        tp = hints[name]
        kwargs[name] = _build(tp, value, key + ".") if _is_section(tp) else _coerce(value, tp, key)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; widen int -> float, accept '3e-4' for floats."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if typing.get_origin(tp) is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; users mean the number.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(key, f"expected {name}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# Value checks that need neither the model nor the world size (those live in parallel.dims.ParallelDims).

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.attn_kernel": ("auto", "cudnn", "flash", "flash_attn", "flex", "cpu_flash", "math"),
    "data.format": ("auto", "text", "chat", "tokens"),
    "data.on_bad_row": ("error", "skip"),
    "parallel.cp_strategy": ("ring", "ulysses", "hybrid", "auto"),
    "parallel.cp_layout": ("zigzag", "contiguous"),
    "parallel.pp_schedule": ("1F1B", "GPipe"),
    "parallel.activation_checkpointing": ("none", "full", "selective", "full_keep_attn"),
    "training.device": ("auto", "cpu", "cuda"),
    "optim.scheduler": ("constant", "linear", "cosine"),
    "checkpoint.export_dtype": ("float32", "bfloat16"),
    "parallel.engine": ENGINES,
    "deepspeed.offload_optimizer": OFFLOAD_DEVICES,
    "deepspeed.offload_params": OFFLOAD_DEVICES,
}
_POSITIVE = (
    "data.num_proc data.max_doc_tokens parallel.dp_replicate parallel.tp parallel.pp parallel.cp "
    "parallel.ulysses parallel.pp_microbatches parallel.gpus_per_node parallel.mlp_chunks training.seq_len "
    "training.micro_batch_size "
    "training.grad_accum training.steps training.loss_chunk logging.every"
).split()
_NON_NEGATIVE = (
    "training.seed training.max_grad_norm training.skip_nonfinite optim.lr optim.weight_decay "
    "optim.warmup_steps checkpoint.interval checkpoint.keep"
).split()
MODEL_TYPES = ("llama", "qwen2", "mistral")


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Raise ConfigError (naming the key) for the first value that cannot work."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            lower = {c.lower(): c for c in choices}
            guess = [lower[g] for g in difflib.get_close_matches(str(value).lower(), list(lower), n=1)]
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise ConfigError(key, f"must be one of {' | '.join(choices)}, got {value!r}{hint}")
    for key in _POSITIVE:
        value = _get(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {_get(cfg, key)}")

    m, p, t, o = cfg.model, cfg.parallel, cfg.training, cfg.optim
    if (m.path is None) == (m.config is None):
        raise ConfigError("model", "set exactly one of model.path (pretrained) or model.config (random init)")
    if m.config is not None and m.config.get("model_type") not in MODEL_TYPES:
        raise ConfigError(
            "model.config.model_type",
            f"must be one of {' | '.join(MODEL_TYPES)}, got {m.config.get('model_type')!r}",
        )
    if p.dp != -1 and p.dp < 1:
        raise ConfigError("parallel.dp", f"must be >= 1 or -1 (infer from world size), got {p.dp}")
    if p.dp != -1 and p.dp % p.dp_replicate:
        raise ConfigError("parallel.dp_replicate", f"must divide parallel.dp={p.dp}, got {p.dp_replicate}")
    if p.cp_strategy == "hybrid":
        if not 1 < p.ulysses < p.cp or p.cp % p.ulysses:
            raise ConfigError(
                "parallel.ulysses",
                f"cp_strategy=hybrid needs 1 < ulysses < cp and cp % ulysses == 0 (got ulysses={p.ulysses}, "
                f"cp={p.cp}); use ring or ulysses for a pure strategy",
            )
    elif p.ulysses != 1 and p.cp_strategy == "auto":
        raise ConfigError("parallel.ulysses", "cp_strategy=auto picks the ulysses degree; leave it at 1")
    elif p.ulysses != 1 and not p.auto:
        what = "ulysses uses ulysses=cp" if p.cp_strategy == "ulysses" else "ring uses ulysses=1"
        raise ConfigError("parallel.ulysses", f"only used with cp_strategy=hybrid ({what}); leave it at 1")
    if p.device_memory_gib is not None and p.device_memory_gib <= 0:
        raise ConfigError("parallel.device_memory_gib", f"must be > 0, got {p.device_memory_gib}")
    if p.cp > 1 and not p.auto:  # parallel.auto replaces cp (and checks the new one)
        chunks = 2 * p.cp if p.cp_layout == "zigzag" else p.cp
        if t.seq_len % chunks:
            what = "2*cp" if p.cp_layout == "zigzag" else "cp"
            raise ConfigError(
                "training.seq_len",
                f"{t.seq_len} is not divisible by {what} = {chunks} (cp_layout={p.cp_layout})",
            )
    if p.sequence_parallel and p.tp > 1 and not p.auto and (t.seq_len // p.cp) % p.tp:
        raise ConfigError(
            "training.seq_len",
            f"tokens per cp rank ({t.seq_len // p.cp}) must be divisible by tp={p.tp} with sequence_parallel",
        )
    for key in ("optim.beta1", "optim.beta2"):
        if not 0 <= _get(cfg, key) < 1:
            raise ConfigError(key, f"must be in [0, 1), got {_get(cfg, key)}")
    if o.eps <= 0:
        raise ConfigError("optim.eps", f"must be > 0, got {o.eps}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        raise ConfigError(
            "checkpoint.resume", f"must be auto | none | an existing checkpoint dir, got {resume!r}"
        )
    if not cfg.output_dir:
        raise ConfigError("output_dir", "must not be empty")
    if cfg.deepspeed.zero_stage not in (1, 2, 3):
        raise ConfigError("deepspeed.zero_stage", f"must be 1 | 2 | 3, got {cfg.deepspeed.zero_stage}")
    validate_engine(cfg)


# ----------------------------------------------------------------------------------------------------------
# Saving and documentation.


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict in schema order (what `save_config` writes and `load_config` reads back)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (schema key order), loadable with `load_config(path, [])`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=False)


@functools.cache
def _attribute_docs() -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} from the string literal under each annotated field."""
    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = docs.setdefault(node.name, {})
            for stmt, nxt in zip(node.body, node.body[1:]):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    fields[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _walk_fields(cls: Any, prefix: str) -> list[tuple[str, Any, Any, str, str]]:
    docs = _attribute_docs().get(cls.__name__, {})
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if _is_section(tp):
            out.extend(_walk_fields(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((key, tp, default, docs.get(f.name, ""), cls.__name__))
    return out


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def config_fields() -> list[tuple[str, str, Any, str]]:
    """Every leaf key as (dotted key, type, default, docstring), in schema order."""
    return [(key, _type_name(tp), default, doc) for key, tp, default, doc, _ in _walk_fields(Config, "")]


def render_config_docs() -> str:
    """Markdown reference of every key; docs/configuration.md is this function's output."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m trainer.config > docs/configuration.md`; edit the docstrings in",
        "trainer/config.py, not this file. -->",
        "",
        "A run is configured by a YAML file and `key=value` overrides:",
        "",
        "```",
        "torchrun --nproc-per-node 8 train.py --config configs/demo.yaml training.steps=10 parallel.cp=4",
        "```",
        "",
        "**Precedence: command line (`key=value`) > YAML file (`--config`) > defaults below.**",
        "Values are parsed as YAML (`10`, `3e-4`, `true`, `null`, `[1, 2]`). Unknown keys are rejected with the",
        "closest valid key suggested; `model.config` is a free mapping of Hugging Face config fields, so any",
        "`model.config.<field>=...` is accepted. `--dry-run` validates the config, the mesh and the model shapes",
        "for `WORLD_SIZE` ranks without creating a process group. The resolved config is saved in the run",
        "directory (`save_config`) and loads back as-is.",
    ]
    section = None
    for key, tp, default, doc in config_fields():
        head = key.split(".")[0] if "." in key else "top level"
        if head != section:
            section = head
            lines += [
                "",
                f"## `{head}`" if head != "top level" else "## Top level",
                "",
                "| key | type | default | description |",
                "|---|---|---|---|",
            ]
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        cells = [c.replace("|", "\\|").replace("<", "&lt;") for c in (tp, shown, doc)]
        lines.append(f"| `{key}` | `{cells[0]}` | `{cells[1]}` | {cells[2]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_config_docs())
