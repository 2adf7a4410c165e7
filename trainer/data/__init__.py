"""Data pipeline: sources -> tokenisation (cached once) -> packing -> per-dp-rank loader.

See docs/data.md for formats, packing / doc-mask semantics, caching, sharding and resume.
"""

from trainer.data.cache import TokenStore, prepare_dataset, preprocess
from trainer.data.loader import LongCtxLoader, build_dataloader, epoch_order
from trainer.data.packing import pack_documents, pack_window
from trainer.data.sources import DataError
from trainer.data.tokenize import load_tokenizer

__all__ = [
    "DataError",
    "LongCtxLoader",
    "TokenStore",
    "build_dataloader",
    "epoch_order",
    "load_tokenizer",
    "pack_documents",
    "pack_window",
    "prepare_dataset",
    "preprocess",
]
