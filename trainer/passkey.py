"""Passkey retrieval: a random key planted in filler text, asked for at the end, scored teacher-forced.

A trial of length L is L + 1 tokens built with the run's tokenizer: [BOS] filler[:k] needle filler[k:]
question answer. The model reads the first L tokens; the labels are -100 everywhere except the positions
whose next token belongs to the answer. The trial passes when the arg-max at each of those positions is
the answer token: the answer's tokens are then exactly what greedy decoding would produce, so a
million-token trial needs one forward pass under CP and no generation loop or KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from parallel.dims import ConfigError

IGNORE = -100
# Filler: plain sentences with no digits, so the only number in the haystack is the key.
FILLER = (
    "The river runs past the old mill and the fields lie quiet under a grey sky. "
    "A cart rolls down the lane while the birds sing in the hedges. "
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass
class Trial:
    length: int
    depth: float
    key: str
    input_ids: np.ndarray  # [length]
    labels: np.ndarray  # [length], -100 except where the next token is an answer token
    answer_positions: np.ndarray  # indices i with labels[i] = answer token
    answer_ids: list[int] = field(default_factory=list)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_trial(tokenizer: Any, length: int, depth: float, key: str) -> Trial:
    """One trial of `length` input tokens with `key` planted at fraction `depth` of the filler.

    Raises ConfigError (eval.passkey_lengths) when the needle and question alone do not fit."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    question = _ids(tokenizer, QUESTION)
    answer = _ids(tokenizer, ANSWER.format(key=key))
    n_fill = length + 1 - len(bos) - len(needle) - len(question) - len(answer)
    if n_fill < 0:
        raise ConfigError(
            "eval.passkey_lengths",
            f"{length} tokens cannot hold the passkey prompt ({length - n_fill} tokens with this tokenizer)",
        )
    sentence = _ids(tokenizer, FILLER)
    filler = (sentence * (n_fill // len(sentence) + 1))[:n_fill]
    # Plant the key at a sentence start (a whole number of filler repeats), nearest to the asked depth.
    at = min(round(depth * n_fill / len(sentence)) * len(sentence), n_fill)
    tokens = np.asarray(bos + filler[:at] + needle + filler[at:] + question + answer, dtype=np.int64)
    labels = np.full(length, IGNORE, dtype=np.int64)
    positions = np.arange(length - len(answer), length)
    labels[positions] = tokens[positions + 1]
    return Trial(length, depth, key, tokens[:length], labels, positions, answer)


def make_trials(tokenizer: Any, lengths: list[int], depths: list[float], seed: int) -> list[Trial]:
    """Every (length, depth) cell once, each with its own 5-digit key drawn from `seed` (reproducible)."""
    rng = np.random.default_rng([seed, 7919])
    return [
        build_trial(tokenizer, n, d, str(int(rng.integers(10_000, 100_000)))) for n in lengths for d in depths
    ]


def trial_batch(trial: Trial) -> dict[str, torch.Tensor]:
    """The trial as a loader batch: one document, positions 0..L-1."""
    n = trial.length
    return {
        "input_ids": torch.from_numpy(trial.input_ids)[None],
        "labels": torch.from_numpy(trial.labels)[None],
        "position_ids": torch.arange(n)[None],
        "doc_ids": torch.zeros(1, n, dtype=torch.long),
    }


def trial_result(trial: Trial, predicted: list[int], tokenizer: Any) -> dict[str, Any]:
    return {
        "length": trial.length,
        "depth": trial.depth,
        "passed": predicted == trial.answer_ids,
        "key": trial.key,
        "answer_tokens": trial.answer_ids,
        "predicted_tokens": predicted,
        "predicted_text": tokenizer.decode(predicted),
    }
