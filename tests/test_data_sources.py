"""Formats (text / chat / tokens), tokenisation cache, bad-data errors and the demo assets."""

import json
import os
import threading
import time

import numpy as np
import pytest

from trainer.config import Config
from trainer.data import DataError, prepare_dataset
from trainer.data.cache import cache_root
from trainer.data.sources import Row
from trainer.data.tokenize import IGNORE, Encoder, EncodeSettings

TOKENIZER = "configs/demo/tokenizer"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_cfg(tmp_path, path, **data):
    cfg = Config()
    cfg.model.tokenizer = TOKENIZER
    cfg.data.path = str(path)
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.training.seq_len = 32
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_demo_assets_load(tok):
    assert tok.bos_token == "<bos>" and tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert 512 <= len(tok) <= 1024
    with open("configs/demo/corpus.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) >= 2000 and all(isinstance(r["text"], str) for r in rows)
    assert os.path.getsize("configs/demo/corpus.jsonl") < 2_000_000
    with open("configs/demo/chat.jsonl") as f:
        chats = [json.loads(line)["messages"] for line in f]
    assert len(chats) >= 40


def test_demo_generator_is_deterministic(tmp_path):
    from trainer.data.demo import generate

    out = generate(tmp_path / "demo")
    for name in ("corpus.jsonl", "chat.jsonl", "tokenizer/tokenizer.json"):
        assert (out / name).read_bytes() == open(f"configs/demo/{name}", "rb").read(), name


def test_chat_masks_prompt(tok):
    with open("configs/demo/chat.jsonl") as f:
        rows = [Row("chat.jsonl", i, line, "jsonl") for i, line in enumerate(f, 1)][:10]
    enc = Encoder(tok, EncodeSettings(fmt="chat"))
    for row, (ids, labels) in zip(rows, enc.encode(rows)):
        msgs = json.loads(row.payload)["messages"]
        kept = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
        answers = "".join(m["content"] + tok.eos_token for m in msgs if m["role"] == "assistant")
        assert kept == answers
        assert labels[0] == IGNORE and all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    # A template without {% generation %} gets the same mask from prefix renderings.
    plain = type(tok).from_pretrained(TOKENIZER)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    enc2 = Encoder(plain, EncodeSettings(fmt="chat"))
    assert not enc2.hf_mask
    for (i1, l1), (i2, l2) in zip(enc.encode(rows), enc2.encode(rows)):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(l1, l2)
    on_prompt = Encoder(tok, EncodeSettings(fmt="chat", train_on_prompt=True)).encode(rows[:1])[0]
    assert on_prompt[1] is None


def test_text_and_tokens_formats(tmp_path, tok):
    text = write_jsonl(tmp_path / "t.jsonl", [{"body": "the cat saw a dog."}, {"body": ""}])
    store = prepare_dataset(make_cfg(tmp_path, text, text_field="body"), tok)
    ids = tok("the cat saw a dog.", add_special_tokens=False)["input_ids"]
    assert store.meta["format"] == "text" and store.labels is None
    exp = [tok.bos_token_id, *ids, tok.eos_token_id, tok.bos_token_id, tok.eos_token_id]
    np.testing.assert_array_equal(store.tokens, exp)
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    toks = write_jsonl(tmp_path / "k.jsonl", rows)
    store = prepare_dataset(make_cfg(tmp_path, toks), tok)
    assert store.meta["format"] == "tokens"
    np.testing.assert_array_equal(store.tokens, [5, 6, 7, 8, 9])  # verbatim: no BOS/EOS
    np.testing.assert_array_equal(store.labels, [5, 6, 7, -100, 9])
    np.testing.assert_array_equal(store.offsets, [0, 3, 5])
    chat = prepare_dataset(make_cfg(tmp_path, "configs/demo/chat.jsonl"), tok)
    assert chat.meta["format"] == "chat" and chat.labels is not None
    assert 0 < chat.meta["n_label_tokens"] < chat.n_tokens


def test_parquet_txt_and_directory(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    d.mkdir()
    pq.write_table(pa.table({"text": ["a b c", "d e"]}), d / "a.parquet")
    (d / "b.txt").write_text("one whole document\nwith two lines")
    store = prepare_dataset(make_cfg(tmp_path, d), tok)
    assert store.n_docs == 3


def test_cache_reuse_and_invalidation(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i} the fox."} for i in range(50)])
    cfg = make_cfg(tmp_path, path)
    first = prepare_dataset(cfg, tok)
    mtime = os.stat(first.path / "tokens.bin").st_mtime_ns
    again = prepare_dataset(cfg, tok)
    assert first.built and not again.built and again.path == first.path
    assert os.stat(again.path / "tokens.bin").st_mtime_ns == mtime
    cfg.data.add_eos = False  # a setting that changes the tokens changes the key
    assert prepare_dataset(cfg, tok).path != first.path
    cfg.data.add_eos = True
    write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i} the owl."} for i in range(50)])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = prepare_dataset(cfg, tok)
    assert changed.built and changed.path != first.path
    assert not [p for p in cache_root(cfg.data).iterdir() if p.name.startswith(".tmp")]


def test_num_proc_matches_serial(tmp_path, tok):
    rows = [{"text": f"sentence {i} " * (i % 7 + 1)} for i in range(1200)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    serial = prepare_dataset(make_cfg(tmp_path, path), tok)
    parallel = prepare_dataset(make_cfg(tmp_path / "other", path, num_proc=2), tok)
    assert parallel.built
    np.testing.assert_array_equal(serial.tokens, parallel.tokens)
    np.testing.assert_array_equal(serial.offsets, parallel.offsets)


def test_other_ranks_wait_for_rank0(tmp_path, tok):
    path = write_jsonl(tmp_path / "w.jsonl", [{"text": "a fox."}] * 20)
    cfg = make_cfg(tmp_path, path)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("r1", prepare_dataset(cfg, tok, rank=1)))
    t.start()
    time.sleep(0.3)
    assert "r1" not in got  # still waiting: nothing written yet
    calls = []
    r0 = prepare_dataset(cfg, tok, rank=0, barrier_fn=lambda: calls.append(1))
    t.join(timeout=30)
    assert got["r1"].path == r0.path and calls == [1]
    cfg.data.add_bos = False
    cfg.data.cache_wait_s = 0.2
    with pytest.raises(DataError, match="timed out"):
        prepare_dataset(cfg, tok, rank=1)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"nope": 1}])
    cfg.data.path, cfg.data.format, cfg.data.cache_wait_s = bad, "text", 30
    with pytest.raises(DataError, match="missing field"):
        prepare_dataset(cfg, tok, rank=0)
    with pytest.raises(DataError, match="rank 0 failed"):  # the marker ends the wait at once
        prepare_dataset(cfg, tok, rank=1)


BAD_CASES = [
    ("missing.jsonl", '{"text": "ok"}\n{"body": "x"}\n', {}, r"missing\.jsonl line 2: missing field 'text'"),
    ("nontext.jsonl", '{"text": "ok"}\n{"text": 5}\n', {}, r"nontext\.jsonl line 2: field 'text' is int"),
    ("broken.jsonl", '{"text": "ok"}\n\n{"text": "x"\n', {}, r"broken\.jsonl line 3: malformed JSON"),
    ("empty.jsonl", "", {}, r"empty\.jsonl: empty file"),
    ("long.jsonl", '{"text": "ok"}\n{"text": "' + "word " * 50 + '"}\n',
     {"max_doc_tokens": 10, "truncate": False}, r"long\.jsonl line 2: document has \d+ tokens > data.max_doc_tokens=10"),
    ("ids.jsonl", '{"input_ids": [1, 2]}\n{"input_ids": [1, 99999]}\n', {}, r"ids\.jsonl line 2: 'input_ids' outside"),
]  # fmt: skip


@pytest.mark.parametrize("name,content,data,match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_data_names_file_and_row(tmp_path, tok, name, content, data, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        prepare_dataset(make_cfg(tmp_path, tmp_path / name, **data), tok)


def test_bad_rows_skipped_and_counted(tmp_path, tok, caplog):
    lines = ['{"text": "good one"}', '{"text": 5}', "{broken", '{"other": 1}', '{"text": "good two"}']
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    cfg = make_cfg(tmp_path, tmp_path / "mixed.jsonl", on_bad_row="skip")
    cfg.training.seq_len = 4
    with caplog.at_level("WARNING", logger="longctx.data"):
        store = prepare_dataset(cfg, tok)
    assert store.n_docs == 2 and store.skipped_rows == 3
    assert "skipped 3 bad rows" in caplog.text and "mixed.jsonl line 3" in caplog.text
    from trainer.data import build_dataloader

    assert build_dataloader(cfg, tok, 0, 1, store=store).skipped_rows == 3
    # truncate: true cuts long documents instead of rejecting them
    cfg2 = make_cfg(tmp_path, write_jsonl(tmp_path / "l.jsonl", [{"text": "word " * 50}]), max_doc_tokens=10)
    assert prepare_dataset(cfg2, tok).n_tokens == 10


def test_config_errors(tmp_path, tok):
    with pytest.raises(DataError, match="data.path: .*no such file"):
        prepare_dataset(make_cfg(tmp_path, tmp_path / "nope.jsonl"), tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported extension"):
        prepare_dataset(make_cfg(tmp_path, tmp_path / "x.csv"), tok)
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match="data.format auto"):
        prepare_dataset(make_cfg(tmp_path, path), tok)
