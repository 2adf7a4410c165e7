"""Row -> token ids (+ per-token label values), for the three formats: text, chat, tokens.

Label convention inside the pipeline: `labels[i]` is the value the model must predict *when token i is the
target* (Hugging Face's unshifted convention: equal to the token id, or -100 when masked). The shift to
next-token targets happens once, in packing, on the full unsharded stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.data.sources import DataError, Row, parse_row

IGNORE = -100
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class EncodeSettings:
    """The data settings that change tokenised output (and therefore the cache key)."""

    fmt: str
    text_field: str = "text"
    messages_field: str = "messages"
    train_on_prompt: bool = False
    add_bos: bool = True
    add_eos: bool = True
    max_doc_tokens: int | None = None
    truncate: bool = True

    @classmethod
    def from_config(cls, data: Any, fmt: str) -> EncodeSettings:
        return cls(
            fmt=fmt,
            text_field=data.text_field,
            messages_field=data.messages_field,
            train_on_prompt=data.train_on_prompt,
            add_bos=data.add_bos,
            add_eos=data.add_eos,
            max_doc_tokens=data.max_doc_tokens,
            truncate=data.truncate,
        )


# A document: (ids, labels) with labels None when equal to ids; a str is a bad-row message.
Encoded = tuple[np.ndarray, np.ndarray | None] | str


class Encoder:
    """Turns raw rows into documents. Bad rows come back as messages naming file and row, so the
    caller decides between raising and skipping (and worker processes never raise mid-batch)."""

    def __init__(self, tokenizer: Any, settings: EncodeSettings):
        self.tok = tokenizer
        self.s = settings
        self.vocab = len(tokenizer)
        self.bos = tokenizer.bos_token_id if settings.add_bos else None
        self.eos = tokenizer.eos_token_id if settings.add_eos else None
        template = getattr(tokenizer, "chat_template", None) or ""
        self.hf_mask = bool(_GENERATION_TAG.search(template if isinstance(template, str) else str(template)))

    def encode(self, rows: list[Row]) -> list[Encoded]:
        out: list[Encoded | None] = [None] * len(rows)
        texts: list[tuple[int, str]] = []
        for i, row in enumerate(rows):
            try:
                rec = parse_row(row)
                if self.s.fmt == "text":
                    texts.append((i, self._text_of(rec, row)))
                elif self.s.fmt == "chat":
                    out[i] = self._finish(*self._chat(rec, row), row)
                else:
                    out[i] = self._finish(*self._tokens(rec, row), row)
            except DataError as e:
                out[i] = str(e)
        if texts:
            # One batched call: the Rust tokenizer is much faster on a batch than row by row.
            ids = self.tok([t for _, t in texts], add_special_tokens=False)["input_ids"]
            for (i, _), doc in zip(texts, ids):
                doc = ([self.bos] if self.bos is not None else []) + doc
                doc = doc + ([self.eos] if self.eos is not None else [])
                out[i] = self._finish(np.asarray(doc, dtype=np.int32), None, rows[i])
        return out  # type: ignore[return-value]

    def _text_of(self, rec: dict, row: Row) -> str:
        f = self.s.text_field
        if f not in rec:
            raise DataError(f"{row.where()}: missing field {f!r} (data.text_field); columns: {sorted(rec)}")
        if not isinstance(rec[f], str):
            raise DataError(f"{row.where()}: field {f!r} is {type(rec[f]).__name__}, expected text")
        return rec[f]

    def _chat(self, rec: dict, row: Row) -> tuple[np.ndarray, np.ndarray | None]:
        f = self.s.messages_field
        msgs = rec.get(f)
        if msgs is None:
            raise DataError(
                f"{row.where()}: missing field {f!r} (data.messages_field); columns: {sorted(rec)}"
            )
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        )
        if not ok or not msgs:
            raise DataError(f"{row.where()}: {f!r} must be a non-empty list of {{role, content}} strings")
        if self.s.train_on_prompt:
            return np.asarray(self._render(msgs), dtype=np.int32), None
        if self.hf_mask:
            enc = self.tok.apply_chat_template(
                msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = np.asarray(enc["input_ids"], dtype=np.int32)
            mask = np.asarray(enc["assistant_masks"], dtype=bool)
        else:
            ids, mask = self._mask_by_prefix(msgs)
        return ids, np.where(mask, ids, IGNORE).astype(np.int32)

    def _render(self, msgs: list[dict], gen_prompt: bool = False) -> list[int]:
        enc = self.tok.apply_chat_template(
            msgs, tokenize=True, return_dict=True, add_generation_prompt=gen_prompt
        )
        return list(enc["input_ids"])

    def _mask_by_prefix(self, msgs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Templates without {% generation %}: an assistant turn is the span between the rendering of
        the history with a generation prompt and the rendering that includes the turn."""
        ids = self._render(msgs)
        mask = np.zeros(len(ids), dtype=bool)
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(self._render(msgs[:k], gen_prompt=True)) if k else 0
            end = len(self._render(msgs[: k + 1]))
            mask[start:end] = True
        return np.asarray(ids, dtype=np.int32), mask

    def _tokens(self, rec: dict, row: Row) -> tuple[np.ndarray, np.ndarray | None]:
        ids = rec.get("input_ids")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise DataError(f"{row.where()}: 'input_ids' must be a list of integers")
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab):
            raise DataError(
                f"{row.where()}: 'input_ids' outside the tokenizer's vocabulary [0, {self.vocab})"
            )
        labels = rec.get("labels")
        if labels is None:
            return arr.astype(np.int32), None
        if not isinstance(labels, list) or len(labels) != len(ids):
            raise DataError(f"{row.where()}: 'labels' must be a list as long as 'input_ids'")
        return arr.astype(np.int32), np.asarray(labels, dtype=np.int32)

    def _finish(self, ids: np.ndarray, labels: np.ndarray | None, row: Row) -> Encoded:
        cap = self.s.max_doc_tokens
        if cap is not None and len(ids) > cap:
            if not self.s.truncate:
                return f"{row.where()}: document has {len(ids)} tokens > data.max_doc_tokens={cap} (data.truncate is false)"
            ids = ids[:cap]
            labels = None if labels is None else labels[:cap]
        return ids, labels


_WORKER: Encoder | None = None


def _init_worker(tokenizer: Any, settings: EncodeSettings) -> None:
    global _WORKER
    _WORKER = Encoder(tokenizer, settings)


def _encode_in_worker(rows: list[Row]) -> list[Encoded]:
    assert _WORKER is not None
    return _WORKER.encode(rows)


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's output: its full serialised model, specials and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    from trainer.data.sources import stable_hash

    return {
        "class": type(tokenizer).__name__,
        "model": stable_hash(model),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "template": str(getattr(tokenizer, "chat_template", None)),
    }


def load_tokenizer(cfg: Any) -> Any:
    """The run's tokenizer: `model.tokenizer`, else `model.path`."""
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or cfg.model.path
    if not name:
        raise DataError(
            "model.tokenizer: not set (and model.path is empty); the data pipeline needs a tokenizer"
        )
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # HF raises OSError/ValueError/HFValidationError for the same user mistake
        raise DataError(f"model.tokenizer: could not load {name!r}: {e}") from None
