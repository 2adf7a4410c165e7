"""Typed run configuration: YAML file + dotted command-line overrides.

Precedence: command line (`key=value`) > YAML file (`--config`) > the defaults below.
Every field has a docstring; these key names are the public interface used by docs and configs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from parallel.dims import ConfigError  # defined there so parallel/ needn't import trainer/
from trainer.config_checks import COMMAND_LINE, MODEL_TYPES, validate, value_source  # noqa: F401  (re-exported)


@dataclass
class ModelConfig:
    path: str | None = None
    """HF hub id or local directory of safetensors (what `save_pretrained` writes, `from_pretrained` reads); each
    rank reads only the slices of its own shards (docs/loading.md)."""
    config: dict[str, Any] | None = None
    """Without `model.path`: inline HF config fields of a randomly initialised model (must include `model_type`:
    llama | qwen2 | qwen3 | mistral | ministral | olmo2 | granite | phi3 | qwen3_moe; the family's init, seeded per
    module by training.seed: the same weights for every layout). With `model.path`: fields overriding the
    pretrained config before the weights load, e.g. `rope_parameters` (or the older `rope_theta` / `rope_scaling`),
    `max_position_embeddings`, `sliding_window`; fields that change a weight's shape are rejected
    (docs/context_extension.md)."""
    dtype: str = "float32"
    """Parameter/compute dtype: float32 | bfloat16."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; defaults to `model.path`."""
    attn_kernel: str = "auto"
    """Local attention kernel under CP: auto | cudnn | flash | flash_attn | cpu_flash | math. auto: cuDNN on
    Hopper and later, else flash_attn when installed, else torch's flash op; math beyond their limits."""


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
    """TP: shard the residual stream and norms over the sequence too (activations /tp)."""
    pp_schedule: str = "1F1B"
    """Pipeline schedule: 1F1B | GPipe."""
    pp_microbatches: int | None = None
    """Microbatches per pipeline step; default = pp."""
    activation_checkpointing: str = "none"
    """none | full | selective (every other layer) | full_keep_attn (full, but attention outputs are kept, not recomputed) | auto (the planner picks the fastest of these predicted to fit in 90% of parallel.device_memory_gib - with activation_offload, full_keep_attn or full; docs/parallelism.md)."""
    cp_accum: str = "float32"
    """float32 | input: dtype of the ring's partial-output and dq/dk/dv accumulators. input (bf16) halves them - 8 GiB each at 512k tokens per GPU for an 8B model - at one extra rounding per ring step; the merge math stays float32."""
    ac_group: int = 1
    """With activation_checkpointing=full: also checkpoint runs of this many layers (two-level), so the forward keeps one input per group (n/g + g layer inputs at once instead of n) for an extra forward of (g-1)/g of the layers; with activation_offload only the group inputs go to the host. For million-token contexts."""
    activation_offload: bool = False
    """Offload saved activations (with checkpointing: the layer or group inputs) to pinned CPU memory, copied on a side stream."""
    mlp_chunks: int = 1
    """Tile each MLP over the sequence in this many chunks (recomputed in backward) to cut its activation peak."""
    compile: bool = False
    """torch.compile each decoder layer (the CP attention stays outside) and the chunked loss."""
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
    host_memory_gib: float = 1024.0
    """Planner: host RAM per node that the model load must fit in (GiB), checked with the per-GPU load peak."""
    plan_calibration: str | None = None
    """Planner: device-rate JSON (`train.py --calibrate f.json` on the GPUs); None = built-in H100 rates."""


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
    loss_impl: str = "chunked"
    """chunked (each chunk's logits recomputed in backward) | fused (gradients computed in the forward pass, chunk by chunk: one LM-head matmul fewer, compiled with parallel.compile) | liger (liger-kernel's fused linear cross-entropy; CUDA, pip install liger-kernel)."""
    fp8: bool = False
    """FP8 matmuls (torchao float8 training, dynamic scaling) in the decoder's q/k/v/o and gate/up/down projections; the LM head and embeddings stay bf16. Hopper GPUs or later, parallel.engine=fsdp2, pip install -e .[fp8]."""
    fp8_recipe: str = "tensorwise"
    """tensorwise (one scale per tensor; allows FP8 all-gather; the faster in full fine-tuning) | rowwise (one scale per row: more accurate; the faster under LoRA, docs/fp8.md) | rowwise_with_gw_hp (rowwise with the weight gradient's GEMM in bf16: torchao's most accurate, 2% slower than tensorwise on the 1B 64k row; LoRA's frozen base has no weight gradient, so there it runs as fast as rowwise)."""
    fp8_bf16_layers: int = 0
    """With training.fp8: the first and the last this many decoder layers keep bf16 projections (where FP8's error is said to hurt most); 0 = every layer in FP8."""
    fp8_all_gather: bool = True
    """With fp8_recipe=tensorwise: FSDP2 all-gathers the weights in FP8 (half the bytes of bf16), their scales computed once after each optimizer step (after the first only under LoRA: frozen weights)."""
    fp8_cache_frozen: bool = True
    """With training.fp8, frozen weights (a LoRA base) that no rank shares - no TP, no FSDP sharding over dp x cp (one GPU, or dp_replicate only), no fsdp_cpu_offload - are cast to FP8 once, not in every matmul (3 times a step under checkpointing): the same FP8 values (bit-identical results on CPU), 2 bytes per base parameter more GPU memory (models/fp8_frozen.py)."""
    init_timeout_min: float = 30.0
    """Process-group timeout (minutes) while ranks start, load the model and wait for tokenisation."""
    step_timeout_min: float = 10.0
    """Process-group timeout (minutes) after the first step: a stuck collective fails fast."""
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


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 = off (full fine-tuning). > 0: the base weights stay frozen in model.dtype and only peft LoRA adapters train (fp32 masters); see docs/lora.md."""
    alpha: float = 16.0
    """LoRA scaling numerator: the adapter's update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter's input (peft lora_dropout), in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers inside the decoder layers that get adapters (peft suffix match); default: the attention and MLP projections."""
    adapter: str | None = None
    """Directory of an existing PEFT adapter (adapter_config.json + weights) to start from; its r, alpha, dropout and target modules apply (lora.r and lora.target_modules must then be left at their defaults or match it)."""


@dataclass
class EvalConfig:
    path: str | None = None
    """Held-out data (every format data.path takes), packed and document-masked as data.path is; None = no held-out loss."""
    every: int = 0
    """Evaluate every N optimizer steps; 0 = only after the last step."""
    max_sequences: int | None = None
    """At most this many held-out sequences (of training.seq_len tokens) per evaluation; None = all of them."""
    passkey: bool = False
    """Also score passkey retrieval (a key planted in filler text, teacher-forced under CP; docs/evaluation.md)."""
    passkey_lengths: list[int] | None = None
    """Passkey sequence lengths in tokens (each <= training.seq_len and divisible as CP needs); None = [training.seq_len]."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where the key is planted, as fractions 0..1 of the filler (0 = start, 1 = just before the question)."""


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    output_dir: str = "outputs/run"
    """Everything a run writes goes under this directory."""


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML -> raw dict -> dotted overrides -> typed dataclasses -> validate().
# Overrides are applied to the raw dict before typing, so CLI > YAML > defaults falls out of the order.


def load_config(path: str | None, overrides: list[str], world_size: int | None = None) -> Config:
    """Build the run config from an optional YAML file and `key=value` overrides, then validate it.

    With `world_size` (the CLI passes WORLD_SIZE) the world-size product is checked before anything else.
    The config remembers where each key came from (`value_source`), so errors can say so."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        raw = _read_yaml(path)
        sources.update(dict.fromkeys(_dotted_keys(raw), path))
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
        sources.update(dict.fromkeys(_dotted_keys({key: value}), COMMAND_LINE))
    return _typed(raw, sources, world_size)


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """The run config from a YAML-shaped dict plus dotted overrides whose values are already parsed
    (`{"parallel.ac_group": 4}`), checked exactly as `load_config` checks a file and the command line."""
    raw = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return _typed(raw, {}, None)


def _dotted_keys(value: Any, prefix: str = "") -> list[str]:
    """The dotted leaf keys of a YAML-shaped dict (sections themselves are not values a user set)."""
    if not isinstance(value, dict):
        return []
    out = []
    for k, v in value.items():
        out += _dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _typed(raw: dict[str, Any], sources: dict[str, str], world_size: int | None) -> Config:
    cfg = _build(Config, raw, "")
    # Not a dataclass field: asdict, equality and the saved YAML ignore it (dataclasses.replace drops it).
    object.__setattr__(cfg, "_sources", sources)
    validate(cfg, world_size)
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


def leaf_keys(cls: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, in order."""
    cls = Config if cls is None else cls
    hints = _hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out.extend(leaf_keys(tp, f"{prefix}{f.name}.") if _is_section(tp) else [f"{prefix}{f.name}"])
    return out


def _unknown(key: str) -> ConfigError:
    valid = leaf_keys()
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
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, key) for v in value]
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


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict in schema order (what `save_config` writes and `load_config` reads back)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (schema key order), loadable with `load_config(path, [])`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=False)
