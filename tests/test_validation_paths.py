"""One validation path: `--dry-run` accepts a layout exactly when the Trainer does, with the same message,
and the planner's reason for a layout is that message too; under torchrun a rejection is one line per rank.

The Trainer side is the real `Trainer.__init__` on 4 gloo ranks: for most cases it stops at the mesh build
(everything that can reject a run happens before it), and a handful of accepted layouts are built whole.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
WORLD = 4


def _model(model_type="llama", heads=4, kv=None, hidden=32, **extra) -> str:
    fields = dict(
        model_type=model_type,
        vocab_size=695,  # the demo tokenizer's size
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv or heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    fields.update(extra)
    return "model.config={" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


MODELS = {
    "q6": _model(heads=6, hidden=48),  # 6 query heads: ulysses 4 cannot split them
    "gqa": _model(heads=4, kv=2),
    "tied": _model(tie_word_embeddings=True),
    "window": _model("mistral", heads=4, kv=2, sliding_window=32),  # window < seq_len 64
    "small_vocab": _model(vocab_size=600),  # fewer embedding rows than the tokenizer has tokens
}
# (parallel.* fields, training.* fields, model.* fields), applied after load_config so every check runs
# in the validation itself rather than at load time.
LAYOUTS = [
    ({}, {}, {}),
    (dict(cp=2), {}, {}),
    (dict(cp=4), {}, {}),
    (dict(cp=4, cp_strategy="ulysses"), {}, {}),
    (dict(cp=4, cp_strategy="hybrid", ulysses=2), {}, {}),
    (dict(cp=2, cp_strategy="ulysses", cp_layout="contiguous"), {}, {}),
    (dict(tp=2), {}, {}),
    (dict(tp=4), {}, {}),
    (dict(tp=2, cp=2, cp_strategy="ulysses"), {}, {}),
    (dict(pp=2, pp_schedule="GPipe"), {}, {}),
    (dict(pp=2), {}, {}),  # 1F1B with a single micro-batch
    (dict(pp=2), dict(grad_accum=2), {}),
    (dict(pp=2, pp_microbatches=3), dict(grad_accum=2), {}),
    (dict(pp=4), {}, {}),  # deeper than 2 layers
    (dict(cp=3), {}, {}),  # 4 ranks are not divisible by 3
    (dict(dp=2, cp=4), {}, {}),  # 8 ranks asked for, 4 present
    (dict(cp=4), dict(seq_len=36), {}),  # 36 tokens are not 8 zigzag chunks
    (dict(tp=4, sequence_parallel=True), dict(seq_len=66), {}),
    (dict(cp=2), {}, dict(attn_kernel="cudnn")),  # a CUDA kernel on a CPU run
    (dict(cp=2, activation_checkpointing="auto"), {}, {}),  # the planner picks the mode
    (dict(activation_checkpointing="auto", device_memory_gib=1e-4), {}, {}),  # and finds that none fits
]
FULL_BUILDS = {  # accepted layouts the workers build whole (model, parallelisms, optimizer, data)
    ("gqa", 4),
    ("gqa", 8),
    ("q6", 11),
    ("gqa", 19),
}


def _cases(tmp) -> list[tuple[tuple[str, int], object]]:
    from trainer.config import load_config

    out = []
    for name, model in MODELS.items():
        base = load_config(
            DEMO,
            [
                model,
                "parallel.dp=-1",
                "parallel.cp=1",
                "training.seq_len=64",
                "training.micro_batch_size=1",
                "training.steps=1",
                "logging.progress=false",
                "checkpoint.export_hf=false",
                f"data.cache_dir={tmp}/cache",
            ],
        )
        for i, (par, train, mod) in enumerate(LAYOUTS):
            cfg = dataclasses.replace(
                base,
                parallel=dataclasses.replace(base.parallel, **par),
                training=dataclasses.replace(base.training, **train),
                model=dataclasses.replace(base.model, **mod),
                output_dir=f"{tmp}/{name}_{i}",
            )
            out.append(((name, i), cfg))
    return out


class _Accepted(Exception):
    """Raised at the mesh build: every check of Trainer.__init__ has passed."""


def _outcome(exc: BaseException | None) -> str:
    if exc is None or isinstance(exc, _Accepted):
        return "OK"
    from trainer.config import ConfigError

    return str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"


def _trainer_worker(rank: int, world: int, cases) -> dict:
    from parallel.dims import ParallelDims
    from trainer.trainer import Trainer

    build_mesh = ParallelDims.build_mesh

    def stop_at_mesh(self, device_type):
        raise _Accepted

    got = {}
    for case, cfg in cases:
        ParallelDims.build_mesh = build_mesh if case in FULL_BUILDS else stop_at_mesh
        try:
            trainer = Trainer(cfg)
            assert case in FULL_BUILDS and trainer.model is not None
            got[case] = _outcome(None)
        except Exception as exc:  # noqa: BLE001 - every outcome is compared with the dry run's
            got[case] = _outcome(exc)
    ParallelDims.build_mesh = build_mesh
    return got


def _dry_run(cfg) -> str:
    from trainer.cli import dry_run

    try:
        dry_run(cfg, WORLD, rank=1)  # rank != 0: nothing printed
    except Exception as exc:  # noqa: BLE001
        return _outcome(exc)
    return "OK"


def _planner(cfg) -> str | None:
    """The planner's reason for cfg's layout (None when the planner does not size it: world, kernel or a
    device memory limit)."""
    from parallel.dims import ConfigError, ParallelDims
    from parallel.planner.enumerate import Layout, check_layout
    from parallel.shape import ModelShape
    from trainer.layout import load_model_config

    p, t = cfg.parallel, cfg.training
    try:
        dims = ParallelDims.from_config(p, WORLD)
    except ConfigError:
        return None
    if cfg.model.attn_kernel != "auto" or p.device_memory_gib is not None:
        return None
    layout = Layout(dims.dp, dims.tp, dims.pp, dims.cp, dims.ulysses, p.cp_layout if dims.cp > 1 else None)
    cand = check_layout(
        layout,
        ModelShape.from_hf(load_model_config(cfg)),
        t.seq_len,
        sequence_parallel=p.sequence_parallel,
        sequences_per_step=t.grad_accum * t.micro_batch_size,
        pp_microbatches=p.pp_microbatches,
        pp_schedule=p.pp_schedule,
    )
    return "OK" if cand.reason is None else cand.reason


def test_dry_run_accepts_exactly_what_the_trainer_accepts(tmp_path):
    cases = _cases(tmp_path)
    dry = {case: _dry_run(cfg) for case, cfg in cases}
    per_rank = run_distributed(_trainer_worker, WORLD, cases, timeout=600)
    assert all(r == per_rank[0] for r in per_rank), "ranks disagree"
    trainer = per_rank[0]
    mismatches = {c: (dry[c], trainer[c]) for c, _ in cases if dry[c] != trainer[c]}
    assert not mismatches, mismatches
    planner_mismatches = {}
    for case, cfg in cases:
        plan = _planner(cfg)
        # The size check needs the tokenizer, which the planner never loads; everything else it sees.
        if plan is not None and not dry[case].startswith("model.config.vocab_size") and plan != dry[case]:
            planner_mismatches[case] = (plan, dry[case])
    assert not planner_mismatches, planner_mismatches

    # The grid must exercise both sides of every check it is about.
    assert all(trainer[c] == "OK" for c in FULL_BUILDS)
    expect = {
        ("tied", 9): "parallel.pp: tied input/output embeddings live on different stages",
        ("gqa", 10): "parallel.pp_microbatches: 1F1B needs at least pp=2 micro-batches per step, got 1",
        ("gqa", 12): "parallel.pp_microbatches: 3 does not divide",
        ("q6", 3): "parallel.cp: num_attention_heads per tp rank (6/1 = 6)",
        ("gqa", 7): "parallel.tp: num_key_value_heads=2 is not divisible by tp=4",
        ("gqa", 13): "parallel.pp: pp=4 exceeds num_hidden_layers=2",
        ("gqa", 14): "parallel.dp: cannot infer dp: world size 4 is not divisible by tp*pp*cp = 3",
        ("gqa", 15): "parallel.dp: dp*tp*pp*cp = 8 does not match world size 4",
        ("gqa", 16): "training.seq_len: 36 is not divisible by 2*cp = 8",
        ("gqa", 17): "training.seq_len: tokens per cp rank (66/1 = 66) must be divisible by tp=4",
        ("gqa", 18): "model.attn_kernel: attention kernel 'cudnn' runs on cuda, not cpu",
        ("window", 0): "model.config.sliding_window: sliding-window attention (32 tokens)",
        ("gqa", 20): "parallel.activation_checkpointing: auto: no checkpointing mode fits",
        ("small_vocab", 0): "model.config.vocab_size: the tokenizer 'configs/demo/tokenizer' has 695 tokens "
        "but the model's embedding has vocab_size=600 rows",
    }
    for case, start in expect.items():
        assert trainer[case].startswith(start), (case, trainer[case])
    assert trainer[("gqa", 4)] == trainer[("q6", 11)] == trainer[("gqa", 19)] == "OK"
    assert sum(v == "OK" for v in trainer.values()) >= 20


def _torchrun(*args: str, tmp) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py"]
    cmd += ["--config", "configs/demo.yaml", f"output_dir={tmp}/out", f"data.cache_dir={tmp}/cache", *args]
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _worker_report(proc: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """(the workers' `config error` lines, the exit codes torchrun reports for them)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error: ")]
    codes = [
        ln.split(":")[1].split()[0] for ln in proc.stderr.splitlines() if ln.strip().startswith("exitcode")
    ]
    return lines, codes


@pytest.mark.parametrize(
    "args, line",
    [
        # found by the Trainer, after the process group exists
        (
            ["parallel.dp=1", "parallel.cp=1", "parallel.pp=2", "model.config.tie_word_embeddings=true"],
            "config error: parallel.pp: tied input/output embeddings live on different stages",
        ),
        # found while parsing: the world-size product first, naming where each degree came from
        (
            ["parallel.cp=3"],
            "config error: parallel.dp: dp*tp*pp*cp = 6 does not match world size 2 (parallel.dp=2 from "
            "configs/demo.yaml, parallel.cp=3 from the command line; parallel.dp=-1 infers dp from the "
            "world size)",
        ),
    ],
    ids=["trainer", "parse"],
)
def test_torchrun_rejection_is_one_line_per_rank_exit_2(tmp_path, args, line):
    proc = _torchrun(*args, tmp=tmp_path)
    lines, codes = _worker_report(proc)
    assert lines == [line, line], proc.stderr[-3000:]
    assert codes == ["2", "2"], proc.stderr[-3000:]
    # torchrun itself always ends a failed job with its own ChildFailedError report (and exit code 1);
    # no worker prints a traceback.
    assert proc.stderr.count("Traceback") <= 1 and "trainer/" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode != 0


# ---- issue 17: the order of complaints, the paths a dry run checks, the tokenizer ----------------------


def _cli(argv: list[str], world: int, capsys, monkeypatch) -> tuple[int, str, str]:
    from trainer.cli import cli_main

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    try:
        code = cli_main(argv, lambda cfg, flags: 0)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_world_size_product_is_reported_first_with_sources(tmp_path, capsys, monkeypatch):
    # demo.yaml's seq_len 512 does not split into 2*3 chunks either; the product is the first problem.
    code, _, err = _cli(["--config", DEMO, "parallel.cp=3", "--dry-run"], 4, capsys, monkeypatch)
    assert code == 2 and err == (
        f"config error: parallel.dp: dp*tp*pp*cp = 6 does not match world size 4 (parallel.dp=2 from {DEMO}, "
        "parallel.cp=3 from the command line; parallel.dp=-1 infers dp from the world size)\n"
    )
    # inferred dp: the degrees that do not divide the world are named with their origin
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(DEMO_TEXT().replace("  dp: 2\n  cp: 2\n", "  dp: -1\n  cp: 3\n"))
    code, _, err = _cli(["--config", str(yaml_path), "--dry-run"], 4, capsys, monkeypatch)
    assert code == 2 and err == (
        "config error: parallel.dp: cannot infer dp: world size 4 is not divisible by tp*pp*cp = 3 "
        f"(parallel.cp=3 from {yaml_path})\n"
    )
    # one degree from the file: every degree set is named
    code, _, err = _cli(["--config", DEMO, "parallel.dp=3", "--dry-run"], 4, capsys, monkeypatch)
    assert err == (
        "config error: parallel.dp: dp*tp*pp*cp = 6 does not match world size 4 (parallel.dp=3 from the "
        f"command line, parallel.cp=2 from {DEMO})\n"
    )
    # all typed on this command line: nothing to add
    argv = ["--config", DEMO, "parallel.dp=2", "parallel.cp=1", "parallel.tp=3", "--dry-run"]
    assert _cli(argv, 4, capsys, monkeypatch)[2] == (
        "config error: parallel.dp: dp*tp*pp*cp = 6 does not match world size 4\n"
    )
    # with the right world size the next problem shows
    code, _, err = _cli(
        ["--config", DEMO, "parallel.cp=3", "parallel.dp=1", "--dry-run"], 3, capsys, monkeypatch
    )
    assert err.startswith("config error: training.seq_len: 512 is not divisible by 2*cp = 6")


def DEMO_TEXT() -> str:
    with open(DEMO, encoding="utf-8") as f:
        return f.read()


def test_dry_run_checks_local_paths(tmp_path, capsys, monkeypatch):
    base = ["--config", DEMO, "--dry-run"]
    for key in ("data.path", "model.tokenizer"):
        missing = tmp_path / "nope" / "x.jsonl"
        code, out, err = _cli([*base, f"{key}={missing}"], 4, capsys, monkeypatch)
        assert code == 2 and err == f"config error: {key}: {missing} does not exist\n" and out == ""
    code, _, err = _cli([*base, "model.config=null", f"model.path={tmp_path}/m"], 4, capsys, monkeypatch)
    assert (
        code == 2 and err == f"config error: model.path: cannot load HF config: {tmp_path}/m does not exist\n"
    )
    # a hub id is accepted and said to be unchecked (the tokenizer then too)
    code, out, err = _cli(
        [*base, "data.path=someone/corpus", "model.tokenizer=someone/tok"], 4, capsys, monkeypatch
    )
    assert code == 0 and err == "", err
    assert "note: data.path=someone/corpus is taken as a hub id; not checked here" in out
    assert "note: model.tokenizer=someone/tok is taken as a hub id" in out
    assert "tokenizer size vs vocab_size not checked" in out and "dry run OK" in out


def _model_dir(tmp_path, vocab: int):
    """A tiny Llama config + the demo tokenizer saved as a model directory (no weights are needed)."""
    from transformers import AutoConfig, AutoTokenizer

    path = tmp_path / "model"
    AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ).save_pretrained(path)  # fmt: skip
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "configs/demo/tokenizer")).save_pretrained(path)
    return path


def test_tokenizer_size_and_demo_tokenizer_warning(tmp_path, capsys, monkeypatch):
    path = _model_dir(tmp_path, vocab=700)
    argv = ["--config", DEMO, "model.config=null", f"model.path={path}", "--dry-run"]
    code, out, err = _cli(argv, 4, capsys, monkeypatch)
    assert code == 0, err
    warning = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert warning == [
        f"warning: model.tokenizer=configs/demo/tokenizer is used, but model.path={path} ships its own "
        "tokenizer; set model.tokenizer=null to use the model's (configs/demo.yaml sets the demo tokenizer)"
    ]
    code, out, err = _cli([*argv, "model.tokenizer=null"], 4, capsys, monkeypatch)
    assert code == 0 and "warning:" not in out
    # an embedding smaller than the tokenizer: one line naming both numbers, from a model dir too
    small = _model_dir(tmp_path / "small", vocab=600)
    code, _, err = _cli([*argv[:-2], f"model.path={small}", "model.tokenizer=null", "--dry-run"], 4, capsys,
                        monkeypatch)  # fmt: skip
    assert code == 2 and err == (
        f"config error: model.tokenizer: the tokenizer '{small}' has 695 tokens but the model's embedding has "
        "vocab_size=600 rows; use the model's own tokenizer or a vocab_size >= 695\n"
    )


def test_plan_and_docs_cite_no_missing_design_doc(capsys, monkeypatch):
    code, out, _ = _cli(["--config", DEMO, "--plan"], 4, capsys, monkeypatch)
    assert code == 0 and "calibration:" in out and "DESIGN" not in out
    for folder in ("docs", "parallel", "trainer"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".md", ".py", ".json")):
                    with open(os.path.join(base, name), encoding="utf-8") as f:
                        assert "DESIGN" not in f.read(), os.path.join(base, name)
