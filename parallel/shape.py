"""ModelShape: the plain numbers of a model config that the layout checks and the planner read.

Built from a Hugging Face config by attribute (`ModelShape.from_hf`), so parallel/ needs neither models/
nor transformers to reason about a model: heads, kv heads, layers and widths, plus the features the CP
attention cannot honour (sliding windows, attention dropout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def head_dim_of(hf_config: Any) -> int:
    """Per-head width: the config's `head_dim` where it sets one, else hidden_size / heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    sliding_window: int | None = None
    """Attention window in tokens when the config enables one (None: full attention)."""
    attention_dropout: float = 0.0
    max_positions: int | None = None
    """max_position_embeddings (None: the config sets none)."""

    @classmethod
    def from_hf(cls, hf: Any) -> ModelShape:
        heads = hf.num_attention_heads
        window = getattr(hf, "sliding_window", None)
        # Qwen2 carries a sliding_window value with use_sliding_window=false: no window then; nor when
        # layer_types lists no sliding layer.
        types = getattr(hf, "layer_types", None)
        if not (window and getattr(hf, "use_sliding_window", True) is not False) or (
            types is not None and "sliding_attention" not in types
        ):
            window = None
        return cls(
            layers=hf.num_hidden_layers,
            hidden=hf.hidden_size,
            heads=heads,
            kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim_of(hf),
            intermediate=hf.intermediate_size,
            vocab=hf.vocab_size,
            tied=bool(getattr(hf, "tie_word_embeddings", False)),
            sliding_window=window,
            attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
            max_positions=getattr(hf, "max_position_embeddings", None),
        )

    def layer_matmul_params(self, tp: int = 1) -> int:
        """Projection weights of one layer held by one TP rank (biases ignored)."""
        h, d = self.hidden, self.head_dim
        q_o = 2 * h * (self.heads // tp) * d
        k_v = 2 * h * (self.kv_heads // tp) * d
        return q_o + k_v + 3 * h * math.ceil(self.intermediate / tp)

    def layer_params(self, tp: int = 1) -> int:
        return self.layer_matmul_params(tp) + 2 * self.hidden  # + the two norms, replicated over tp

    def root_params(self, pp: int = 1) -> int:
        """Embedding, final norm and LM head of the heaviest stage (TP keeps them replicated)."""
        vh = self.vocab * self.hidden
        if pp > 1:
            return vh + self.hidden  # first stage: embedding; last: norm + head
        return vh * (1 if self.tied else 2) + self.hidden

    def non_embedding_params(self) -> int:
        return self.layers * self.layer_params()
