"""Evaluation under CP (issue 20) against the unsharded transformers model.

One 4-rank gloo group runs `--eval-only` on every layout (cp=4 ring / ulysses / hybrid, dp2 x cp2, tp2 x cp2
with sequence parallel) for a fresh random model saved with `save_pretrained`, plus a tiny model trained (in
this process, ~100 CPU steps) to retrieve passkeys; it also trains dp2 x cp2 with an evaluation at the end, exports the model and
evaluates the export with --eval-only. The parent recomputes everything with the plain HF model: each
held-out document segment scored alone, and the arg-max at every passkey answer position.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "configs/demo/tokenizer")
CORPUS = os.path.join(ROOT, "configs/demo/corpus.jsonl")
SEQ = 128
LENGTHS, DEPTHS = [64, 128], [0.0, 0.5, 1.0]
MAX_SEQ = 7  # odd: dp ranks get unequal shares, padded with target-free sequences

RANDOM = dict(
    vocab_size=695,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
TRAINED = dict(RANDOM, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)

CASES = [  # (name, model, overrides)
    (
        "cp4-ring-ac-full",
        "random",
        ["parallel.cp=4", "parallel.activation_checkpointing=full", "parallel.mlp_chunks=2"],
    ),
    ("cp4-ulysses", "random", ["parallel.cp=4", "parallel.cp_strategy=ulysses"]),
    ("cp4-hybrid", "random", ["parallel.cp=4", "parallel.cp_strategy=hybrid", "parallel.ulysses=2"]),
    ("dp2-cp2-mbs2", "random", ["parallel.dp=2", "parallel.cp=2", "training.micro_batch_size=2"]),
    ("tp2-cp2-sp", "random", ["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true"]),
    ("trained-cp4-ring", "trained", ["parallel.cp=4", "eval.path=null", "eval.passkey_lengths=[64]"]),
]


def _overrides(model_dir, out, tmp, extra=()):
    return [
        f"model.path={model_dir}",
        f"model.tokenizer={TOKENIZER}",
        f"data.cache_dir={tmp}/cache",
        f"training.seq_len={SEQ}",
        "training.device=cpu",
        "training.steps=2",
        "logging.progress=false",
        "checkpoint.export_dtype=float32",
        f"eval.path={tmp}/heldout.jsonl",
        f"eval.max_sequences={MAX_SEQ}",
        "eval.passkey=true",
        f"eval.passkey_lengths={LENGTHS}",
        f"eval.passkey_depths={DEPTHS}",
        f"output_dir={out}",
        *extra,
    ]


def _ranks(rank, world, model_dirs, tmp):
    from trainer.config import ConfigError, load_config
    from trainer.eval_only import EvalOnlyRun
    from trainer.trainer import Trainer

    out = {}
    for name, model, extra in CASES:
        cfg = load_config(None, _overrides(model_dirs[model], f"{tmp}/{name}", tmp, extra))
        t = EvalOnlyRun(cfg)
        calls = [0]
        for layer in t.model.model.layers.values():
            layer.register_forward_hook(lambda *a, c=calls: c.__setitem__(0, c[0] + 1))
        rec = t.run()
        out[name] = {"record": rec, "layer_calls": calls[0], "optimizer": hasattr(t, "optimizer")}

    # Train dp2 x cp2 with the evaluation after the last step, then score the HF export with --eval-only.
    train = _overrides(model_dirs["random"], f"{tmp}/train", tmp, ["parallel.dp=2", "parallel.cp=2"])
    t = Trainer(load_config(None, train + ["eval.every=1", "optim.lr=3e-3"]))
    t.train()
    out["trained_evals"] = [e["eval_loss"] for e in t.evaluations]
    t = EvalOnlyRun(
        load_config(None, _overrides(f"{tmp}/train/hf", f"{tmp}/export_eval", tmp, ["parallel.cp=4"]))
    )
    out["export_eval"] = t.run()["eval_loss"]

    try:  # held-out data shorter than one sequence: a config error naming eval.path
        EvalOnlyRun(load_config(None, _overrides(model_dirs["random"], f"{tmp}/short", tmp, [
            "parallel.cp=4", f"eval.path={tmp}/short.jsonl"])))  # fmt: skip
        out["short"] = None
    except ConfigError as exc:
        out["short"] = str(exc)
    return out


# ---- references ---------------------------------------------------------------------------------------
def _heldout_windows(tok):
    """The held-out sequences built independently: BOS + text + EOS per document, packed with doc masks."""
    from trainer.data.packing import pack_documents

    docs = []
    with open(HELDOUT_SRC) as f:
        for line in f:
            docs.append([tok.bos_token_id, *tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"],
                         tok.eos_token_id])  # fmt: skip
    return pack_documents(docs, SEQ, doc_mask=True)[:MAX_SEQ]


def _hf_heldout(model, windows, edges):
    """Sum of token losses / targets, every document segment of every window run alone through HF."""
    total, count = 0.0, 0
    buckets = np.zeros((len(edges) - 1, 2))
    for w in windows:
        for d in np.unique(w["doc_ids"]):
            sel = w["doc_ids"] == d
            ids, labels = torch.from_numpy(w["input_ids"][sel])[None], torch.from_numpy(w["labels"][sel])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()
            ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
            valid = labels != -100
            total += ce[valid].sum().item()
            count += int(valid.sum())
            pos = np.arange(len(labels))[valid.numpy()]
            b = np.searchsorted(edges, pos, side="right") - 1
            np.add.at(buckets[:, 0], b, ce[valid].numpy())
            np.add.at(buckets[:, 1], b, 1)
    return total / count, [s / n if n else None for s, n in buckets]


def _hf_passkey(model, trials):
    preds = []
    for t in trials:
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(t.input_ids)[None]).logits[0]
        preds.append(logits[torch.from_numpy(t.answer_positions)].argmax(-1).tolist())
    return preds


def _train_passkey_model(tok, path):
    """A tiny Llama trained on passkey trials of 64 tokens (loss on the answer only) until it retrieves
    every key of a fresh batch: a model that has learned the answer, for the accuracy-1.0 check."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.passkey import build_trial

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("llama", **TRAINED), attn_implementation="sdpa"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(int(torch.randint(0, 2**30, ())))

    def batch(n):
        ts = [build_trial(tok, 64, float(rng.random()), str(rng.integers(10_000, 100_000))) for _ in range(n)]
        return (torch.from_numpy(np.stack([t.input_ids for t in ts])),
                torch.from_numpy(np.stack([t.labels for t in ts])))  # fmt: skip

    for step in range(1, 601):
        x, y = batch(32)
        F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0:
            x, y = batch(64)
            with torch.no_grad():
                ok = ((model(input_ids=x).logits.argmax(-1) == y) | (y == -100)).all(1).all()
            if ok:
                break
    assert ok, "the passkey model did not learn to retrieve in 600 steps"
    model.save_pretrained(path)


HELDOUT_SRC = None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    global HELDOUT_SRC
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("eval")
    lines = open(CORPUS).read().splitlines()
    HELDOUT_SRC = str(tmp / "heldout.jsonl")
    with open(HELDOUT_SRC, "w") as f:
        f.write("\n".join(lines[-30:]) + "\n")  # documents the demo model is not trained on first
    (tmp / "short.jsonl").write_text(json.dumps({"text": "too short"}) + "\n")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    seed = int(torch.randint(0, 2**30, ()))
    print(f"seed {seed}")
    torch.manual_seed(seed)
    dirs = {"random": str(tmp / "random"), "trained": str(tmp / "trained")}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **RANDOM)).save_pretrained(dirs["random"])
    _train_passkey_model(tok, dirs["trained"])
    return tmp, dirs, tok


@pytest.mark.timeout(1800)  # ~40 s on an idle 2-core machine; the fixture trains a model on the CPU
def test_eval_under_cp_equals_unsharded_hf(setup):
    from transformers import AutoModelForCausalLM

    from trainer.evaluate import position_edges
    from trainer.passkey import make_trials

    tmp, dirs, tok = setup
    got = run_distributed(_ranks, 4, dirs, str(tmp), timeout=900)[0]
    ref = {
        k: AutoModelForCausalLM.from_pretrained(v, dtype=torch.float32, attn_implementation="eager")
        for k, v in dirs.items()
    }
    windows = _heldout_windows(tok)
    edges = position_edges(SEQ)
    loss, by_pos = _hf_heldout(ref["random"], windows, edges)
    failures = []
    for name, model, _ in CASES:
        rec, seen = got[name]["record"], got[name]
        assert not seen["optimizer"], f"{name}: --eval-only built an optimizer"
        lengths = [64] if model == "trained" else LENGTHS
        trials = make_trials(tok, lengths, DEPTHS, 0)
        if model == "random":
            rel = abs(rec["eval_loss"] - loss) / loss
            got_pos = [b["loss"] for b in rec["loss_by_position"]]
            assert [a is None for a in got_pos] == [b is None for b in by_pos], (got_pos, by_pos)
            rel_pos = max(abs(a - b) / b for a, b in zip(got_pos, by_pos) if b is not None)
            if rel > 1e-5 or rel_pos > 1e-5 or rec["eval_sequences"] != MAX_SEQ:
                failures.append(f"{name}: eval_loss {rec['eval_loss']:.8f} vs HF {loss:.8f} ({rel:.1e}), "
                                f"by position {rel_pos:.1e}")  # fmt: skip
            assert math.isclose(rec["eval_ppl"], math.exp(rec["eval_loss"]), rel_tol=1e-9)
            assert rec["eval_tokens"] == MAX_SEQ * SEQ and rec["eval_tokens_per_s"] > 0
        # seeded: the run built the same trials (keys, depths) as make_trials does here
        assert [(t["key"], t["length"], t["depth"]) for t in rec["passkey"]["trials"]] == [
            (t.key, t.length, t.depth) for t in trials
        ]
        preds = [t["predicted_tokens"] for t in rec["passkey"]["trials"]]
        if preds != _hf_passkey(ref[model], trials):
            failures.append(f"{name}: passkey arg-max differs from HF")
        acc = rec["passkey_accuracy"]
        if (model == "trained" and acc != 1.0) or (model == "random" and acc > 0.2):
            failures.append(f"{name}: passkey accuracy {acc}")
        # files: eval.jsonl (one record), loss-by-position plot, passkey JSON + heatmap
        out = tmp / name
        lines = (out / "eval.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["step"] == 0
        pk = json.loads((out / "eval" / "passkey_step0.json").read_text())
        assert pk["step"] == 0 and len(pk["trials"]) == len(lengths) * len(DEPTHS)
        assert {"length", "depth", "passed"} <= set(pk["trials"][0])
        assert (out / "eval" / "passkey_step0.png").stat().st_size > 1000
        if model == "random":
            assert (out / "eval" / "loss_by_position_step0.png").stat().st_size > 1000
    assert not failures, "\n".join(failures)

    # No recompute: with full activation checkpointing and a tiled MLP each layer runs once per forward.
    mbs_batches = MAX_SEQ  # cp4: one dp rank scores all 7 sequences, one per forward
    forwards = mbs_batches + len(LENGTHS) * len(DEPTHS)
    assert got["cp4-ring-ac-full"]["layer_calls"] == 2 * forwards

    # Training evaluates after each step (eval.every=1) and after the last; the HF export scores the same.
    evals = got["trained_evals"]
    assert len(evals) == 2 and evals[1] != evals[0]
    assert abs(got["export_eval"] - evals[-1]) / evals[-1] <= 1e-6, (got["export_eval"], evals[-1])
    lines = [json.loads(x) for x in (tmp / "train" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and "weights" not in lines[0]
    assert (tmp / "train" / "eval" / "loss_by_position_step2.png").is_file()
    assert json.loads((tmp / "export_eval" / "eval.jsonl").read_text())["weights"] == f"{tmp}/train/hf"
    assert got["short"] and got["short"].startswith("eval.path:"), got["short"]


def _config_error(*overrides):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.config={model_type: llama}", "training.seq_len=128", *overrides])
    return str(exc.value)


def test_bad_eval_input_is_one_line_config_error(tmp_path):
    assert _config_error("eval.path=/no/such/heldout.jsonl").startswith("eval.path:")
    msg = _config_error("eval.passkey=true", "eval.passkey_lengths=[256]")
    assert msg.startswith("eval.passkey_lengths:") and "seq_len" in msg
    msg = _config_error("eval.passkey=true", "eval.passkey_lengths=[100]", "parallel.cp=4")
    assert msg.startswith("eval.passkey_lengths:") and "divisible by 8" in msg
    assert _config_error("eval.passkey=true", "eval.passkey_depths=[1.5]").startswith("eval.passkey_depths:")
    assert _config_error("eval.passkey=true", "parallel.pp=2").startswith("eval:")
    assert _config_error("eval.every=-1").startswith("eval.every:")

    from transformers import AutoTokenizer

    from trainer.config import ConfigError
    from trainer.passkey import build_trial

    with pytest.raises(ConfigError, match="eval.passkey_lengths"):
        build_trial(AutoTokenizer.from_pretrained(TOKENIZER), 16, 0.5, "12345")

    # The command line: one line on stderr, exit code 2, nothing written.
    cmd = [sys.executable, "train.py", "--config", "configs/demo.yaml", f"output_dir={tmp_path}/run",
           "parallel.dp=1", "parallel.cp=1", "--eval-only"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("config error: eval: --eval-only needs eval.path")
    proc = subprocess.run(
        cmd + ["eval.path=missing.jsonl"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and proc.stderr.startswith("config error: eval.path:"), proc.stderr
    assert not (tmp_path / "run").exists()


def test_report_files_and_wandb_offline(tmp_path, monkeypatch):
    """Three evaluations through trainer/eval_report: eval.jsonl lines, one plot line per evaluation, the
    passkey JSON and heatmap (a repeated step never overwrites the earlier files), and W&B (offline)
    scalars, images and the trials table."""
    import time
    from types import SimpleNamespace

    from trainer.eval_report import report
    from trainer.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    out = tmp_path / "run"
    m = MetricsLogger(SimpleNamespace(every=1, wandb=True, progress=False), out, 0, 1, {})
    trials = [
        {"length": n, "depth": d, "passed": n == 64, "key": "12345", "predicted_text": " 12345"}
        for n in (64, 128)
        for d in (0.0, 1.0)
    ]
    for step, loss in ((1, 3.0), (2, 2.5), (2, 2.5)):  # the second step-2 record: an --eval-only rerun
        buckets = [
            {"from": 0, "to": 16, "loss": loss, "targets": 5},
            {"from": 16, "to": 32, "loss": loss - 1, "targets": 5},
        ]
        record = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss), "eval_tokens": 64,
                  "eval_time_s": 0.1, "eval_tokens_per_s": 640.0, "loss_by_position": buckets,
                  "passkey_accuracy": 0.5}  # fmt: skip
        report(out, record, {"accuracy": 0.5, "time_s": 0.1, "trials": trials}, m)
    m.close()
    lines = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 2]
    assert (out / "eval" / "passkey_step2-2.json").is_file()  # the first step-2 files are kept
    assert (out / "eval" / "loss_by_position_step2-2.png").is_file()
    for step in (1, 2):
        assert (out / "eval" / f"loss_by_position_step{step}.png").stat().st_size > 1000
        assert (out / "eval" / f"passkey_step{step}.png").stat().st_size > 1000
    assert json.loads((out / "eval" / "passkey_step2.json").read_text())["accuracy"] == 0.5
    run_id = (out / "wandb_run_id").read_text().strip()
    (run,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    deadline, log = time.time() + 60, b""
    while time.time() < deadline:  # wandb's service may still be flushing after finish()
        log = (run / f"run-{run_id}.wandb").read_bytes()
        if b"eval/passkey_trials" in log and b"eval/loss_pos_16_32" in log:
            break
        time.sleep(0.5)
    assert b"eval_loss" in log and b"eval/passkey_trials" in log and b"eval/loss_pos_16_32" in log
    assert list(run.rglob("*.png")), "W&B got no images"
