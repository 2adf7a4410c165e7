"""`model.path` plus `model.config`: a pretrained config with some fields overridden before the model is built.

Only fields that leave every weight's shape alone may change (RoPE, `max_position_embeddings`, sliding
windows, ...): the pretrained weights must still load. RoPE is merged by hand because transformers 5.24's
`from_pretrained(path, rope_theta=...)` silently keeps the old theta, and `rope_scaling=...` drops it
(the saved config then has `rope_theta: None`); here all three spellings land in one `rope_parameters` dict:

- `rope_parameters` (transformers 5): `rope_type` plus its fields. The same `rope_type` as the pretrained
  config (or none) updates those fields; another type replaces them. `rope_theta` is kept unless given.
- `rope_scaling` (transformers 4): like `rope_parameters`; its `type` key is read as `rope_type`, and `null`
  means back to the default (unscaled) RoPE.
- `rope_theta` (transformers 4): the base frequency alone.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from parallel.dims import ConfigError

# Fields that size a weight: changing them would make the pretrained tensors unloadable (or silently drop them).
SHAPE_FIELDS = frozenset(
    """hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    vocab_size moe_intermediate_size num_experts num_local_experts shared_expert_intermediate_size
    tie_word_embeddings attention_bias mlp_bias""".split()
)
ROPE_SPELLINGS = ("rope_parameters", "rope_scaling", "rope_theta")


def rope_types() -> tuple[str, ...]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ("default", *ROPE_INIT_FUNCTIONS)


def _rope_update(key: str, value: Any) -> dict:
    """The override as a flat rope dict (`rope_type` only where the user named one)."""
    if value is None:
        if key == "rope_scaling":
            return {"rope_type": "default"}
        raise ConfigError(f"model.config.{key}", "must be a mapping, not null")
    if not isinstance(value, dict):
        raise ConfigError(f"model.config.{key}", f"must be a mapping of RoPE fields, got {value!r}")
    update = dict(value)
    if "type" in update:  # transformers 4's key for the scaling type
        kind = update.pop("type")
        update.setdefault("rope_type", kind)
    kind = update.get("rope_type")
    if kind is not None and kind not in rope_types():
        guess = difflib.get_close_matches(str(kind), rope_types(), n=1)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        raise ConfigError(
            f"model.config.{key}.rope_type", f"must be one of {' | '.join(rope_types())}, got {kind!r}{hint}"
        )
    factor = update.get("factor")
    if factor is not None and (
        isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1
    ):
        # transformers only warns; a factor below 1 shrinks the context instead of extending it
        raise ConfigError(f"model.config.{key}.factor", f"must be a number >= 1, got {factor!r}")
    return update


def merged_rope(current: dict | None, overrides: dict) -> dict | None:
    """The pretrained `rope_parameters` with the user's RoPE overrides (any of the three spellings) applied."""
    given = [k for k in ROPE_SPELLINGS if k in overrides]
    if not given:
        return current
    if "rope_parameters" in given and "rope_scaling" in given:
        raise ConfigError("model.config.rope_scaling", "set rope_parameters or rope_scaling, not both")
    rope = copy.deepcopy(current) if current else {"rope_type": "default"}
    if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(
            "model.config.rope_parameters", "per-layer-type RoPE parameters cannot be overridden"
        )
    for key in ("rope_parameters", "rope_scaling"):
        if key in overrides:
            update = _rope_update(key, overrides[key])
            kind = update.get("rope_type", rope.get("rope_type", "default"))
            if kind != rope.get("rope_type", "default"):
                rope = {"rope_theta": rope.get("rope_theta")}  # a new type: the old type's fields go
            rope.update(update)
            rope["rope_type"] = kind
    if "rope_theta" in overrides:
        theta = overrides["rope_theta"]
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            raise ConfigError("model.config.rope_theta", f"must be a positive number, got {theta!r}")
        rope["rope_theta"] = float(theta)
    return {k: v for k, v in rope.items() if v is not None}


def apply_overrides(config: Any, overrides: dict) -> Any:
    """A copy of the pretrained HF `config` with `overrides` applied (the pretrained object is not changed).

    Raises ConfigError naming `model.config.<field>` for a field that would change a weight's shape, a
    field this model type does not have, or RoPE parameters transformers rejects."""
    fields = dict(overrides)
    model_type = fields.pop("model_type", config.model_type)
    if model_type != config.model_type:
        raise ConfigError(
            "model.config.model_type",
            f"{model_type!r} differs from the pretrained model's {config.model_type!r}; drop it or use "
            f"{config.model_type!r}",
        )
    known = config.to_dict()
    for key, value in fields.items():
        if key in SHAPE_FIELDS and value != known.get(key):
            raise ConfigError(
                f"model.config.{key}",
                f"changes a weight's shape (pretrained {known.get(key)!r}, override {value!r}); only fields "
                "that keep the pretrained weights loadable (RoPE, max_position_embeddings, sliding_window, ...) "
                "can be overridden on a model.path model",
            )
        if key not in known and key not in ROPE_SPELLINGS:
            guess = difflib.get_close_matches(key, list(known) + list(ROPE_SPELLINGS), n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise ConfigError(
                f"model.config.{key}", f"{config.model_type} configs have no field {key!r}{hint}"
            )
    rope = merged_rope(getattr(config, "rope_parameters", None), fields)
    data = {k: v for k, v in known.items() if k not in ROPE_SPELLINGS}
    data.update({k: v for k, v in fields.items() if k not in ROPE_SPELLINGS})
    if rope is not None:
        data["rope_parameters"] = rope
        # Phi-3 keeps the pretraining length outside rope_parameters, and transformers prefers that copy.
        if "original_max_position_embeddings" in data and "original_max_position_embeddings" in rope:
            data["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    try:
        new = config.__class__.from_dict(data)
        new.validate_rope()
    except (ValueError, KeyError, TypeError) as exc:
        key = next((k for k in ROPE_SPELLINGS if k in fields), "model.config")
        raise ConfigError(f"model.config.{key}" if key != "model.config" else key, _one_line(exc)) from None
    new._name_or_path = getattr(config, "_name_or_path", "")
    return new


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
