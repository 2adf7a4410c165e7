"""ParallelDims: degree resolution, model-shape checks, rank coordinates, and the real DeviceMesh on gloo."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from parallel.dims import FLATTENED_DIMS, MESH_DIM_NAMES, ConfigError, ParallelDims, sub_rank_and_size
from tests.dist import run_distributed
from trainer.cli import dry_run
from trainer.config import ParallelConfig, load_config


def dims(world: int, **kw) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(**kw), world)


def error(world: int, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        dims(world, **kw)
    return info.value


def hf(heads=8, kv=None, layers=4, **extra):
    return AutoConfig.for_model(
        "llama",
        num_attention_heads=heads,
        num_key_value_heads=kv or heads,
        num_hidden_layers=layers,
        hidden_size=heads * 16,
        intermediate_size=64,
        vocab_size=128,
        **extra,
    )


def test_dp_inference_and_degrees():
    d = dims(8, tp=2, cp=2)
    assert (d.dp, d.dp_shard, d.dp_replicate, d.ring, d.ulysses) == (2, 2, 1, 2, 1)
    assert dims(1) == ParallelDims(1, 1, 1, 1, 1, 1, 1)
    d = dims(16, dp=4, dp_replicate=2, pp=2, cp=2)
    assert (d.dp, d.dp_replicate, d.dp_shard, d.sizes) == (4, 2, 2, (2, 2, 2, 2, 1, 1))
    assert (
        dims(8, cp=8, cp_strategy="ulysses").ulysses == 8 and dims(8, cp=8, cp_strategy="ulysses").ring == 1
    )
    h = dims(16, cp=8, cp_strategy="hybrid", ulysses=2)
    assert (h.dp, h.ring, h.ulysses) == (2, 4, 2)
    assert "ring 4 x ulysses 2" in h.describe()


def test_from_config_errors():
    assert str(error(8, dp=3, tp=2)) == "parallel.dp: dp*tp*pp*cp = 6 does not match world size 8"
    err = error(8, tp=3)
    assert err.key == "parallel.dp" and "cannot infer dp" in err.reason and "tp*pp*cp = 3" in err.reason
    assert error(8, dp_replicate=3).key == "parallel.dp_replicate"
    assert error(8, tp=0).key == "parallel.tp"
    assert error(8, dp=0).key == "parallel.dp"
    assert error(0).key == "WORLD_SIZE"
    assert error(8, cp=4, ulysses=2).key == "parallel.ulysses"  # ring strategy ignores ulysses: reject
    assert error(8, cp=4, cp_strategy="ulysses", ulysses=2).key == "parallel.ulysses"
    for u in (1, 4, 3):
        assert "1 < ulysses < cp" in error(8, cp=4, cp_strategy="hybrid", ulysses=u).reason
    assert error(8, cp_strategy="striped").key == "parallel.cp_strategy"


def test_coords_and_rank_table_dp2_tp2_cp2():
    d = dims(8, dp=2, tp=2, cp=2)
    got = [d.coords(r) for r in range(8)]
    # tp innermost, then cp (ring), then dp.
    assert [(c["dp"], c["cp"], c["tp"]) for c in got] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)
    ]  # fmt: skip
    assert all(c["pp"] == 0 and c["ulysses"] == 0 and c["ring"] == c["cp"] for c in got)
    lines = d.rank_table().splitlines()
    assert lines[0].split() == ["rank", "pp", "dp", "cp", "ring", "ulysses", "tp"]
    assert lines[6].split() == ["5", "0", "1", "0", "0", "0", "1"] and len(lines) == 9
    with pytest.raises(ValueError):
        d.coords(8)


def test_coords_hybrid_and_hsdp():
    h = dims(8, dp=1, cp=8, cp_strategy="hybrid", ulysses=2)
    # ulysses inside ring: consecutive ranks form a ulysses group, cp rank = ring * ulysses + ulysses.
    assert [(h.coords(r)["ring"], h.coords(r)["ulysses"], h.coords(r)["cp"]) for r in range(4)] == [
        (0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)
    ]  # fmt: skip
    d = dims(8, dp=4, dp_replicate=2, cp=2)
    assert d.coords(7) == {
        "pp": 0, "dp": 3, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "ring": 1, "ulysses": 0, "tp": 0
    }  # fmt: skip
    assert "dp_replicate" in d.rank_table().splitlines()[0]


@pytest.mark.parametrize(
    "world, par, model, key, words",
    [
        # q heads must split over tp ...
        (3, dict(tp=3), dict(heads=8, kv=8), "parallel.tp", "num_attention_heads=8 is not divisible by tp=3"),
        # ... and then over the ulysses degree (pure ulysses: the key to change is cp)
        (16, dict(cp=16, cp_strategy="ulysses"), dict(heads=8), "parallel.cp", "cp_strategy=ring"),
        (
            8,
            dict(cp=8, cp_strategy="hybrid", ulysses=4),
            dict(heads=6, kv=6),
            "parallel.ulysses",
            "ulysses=2",
        ),
        (8, dict(tp=2, cp=4, cp_strategy="ulysses"), dict(heads=12, kv=12), "parallel.cp", "12/2 = 6"),
        # GQA: kv heads are sharded by tp, never replicated across tp
        (4, dict(tp=4), dict(heads=8, kv=2), "parallel.tp", "num_key_value_heads=2 is not divisible by tp=4"),
        # GQA: kv heads per tp rank neither divisible by ulysses nor dividing it
        (
            8,
            dict(cp=8, cp_strategy="hybrid", ulysses=2),
            dict(heads=12, kv=3),
            "parallel.ulysses",
            "(3/1 = 3)",
        ),
        (8, dict(cp=4, cp_strategy="ulysses", tp=2), dict(heads=24, kv=12), "parallel.cp", "(12/2 = 6)"),
        (1, dict(), dict(heads=16, kv=12), "model", "not a multiple of num_key_value_heads=12"),
        (
            6,
            dict(cp=6, cp_strategy="ulysses"),
            dict(heads=24, kv=4),
            "parallel.cp",
            "divisible by the ulysses",
        ),
        # pipeline deeper than the model
        (8, dict(pp=8), dict(heads=8, layers=4), "parallel.pp", "pp=8 exceeds num_hidden_layers=4"),
    ],
)
def test_validate_model_errors(world, par, model, key, words):
    d = dims(world, **par)
    with pytest.raises(ConfigError) as info:
        d.validate_model(hf(**model), 96, strategy=par.get("cp_strategy", "ring"))
    assert info.value.key == key and words in info.value.reason, str(info.value)


def test_validate_model_accepts_gqa_layouts_and_seq_checks():
    # kv per tp rank divisible by ulysses: no replication
    assert dims(8, tp=2, cp=4, cp_strategy="ulysses").validate_model(hf(16, 8), 64, strategy="ulysses") == []
    # kv per tp rank < ulysses and dividing it: replicated, reported as a note
    notes = dims(8, tp=2, cp=4, cp_strategy="hybrid", ulysses=2).validate_model(
        hf(8, 2), 64, strategy="hybrid"
    )
    assert len(notes) == 1 and "replicated 2x" in notes[0]
    notes = dims(6, cp=6, cp_strategy="ulysses").validate_model(hf(24, 3), 96, strategy="ulysses")
    assert "replicated 2x" in notes[0]
    # MQA with pure ulysses
    assert (
        "replicated 8x"
        in dims(8, cp=8, cp_strategy="ulysses").validate_model(hf(8, 1), 64, strategy="ulysses")[0]
    )
    # explicit head_dim (not hidden/heads) is fine
    assert dims(2, tp=2).validate_model(hf(8, 2, head_dim=32), 64) == []
    # sequence checks
    d = dims(8, tp=2, cp=4)
    with pytest.raises(ConfigError, match=r"training.seq_len: 100 is not divisible by 2\*cp = 8"):
        d.validate_model(hf(8, 2), 100)
    d.validate_model(hf(8, 2), 100, layout="contiguous")
    with pytest.raises(ConfigError, match="training.seq_len: .*sequence_parallel"):
        dims(6, tp=2, cp=3).validate_model(hf(8, 2), 9, sequence_parallel=True, layout="contiguous")
    assert "max_position_embeddings" in d.validate_model(hf(8, 2, max_position_embeddings=32), 64)[0]


def test_dry_run_prints_plan_without_process_group(tmp_path, capsys):
    import torch.distributed as dist

    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  config: {model_type: llama, num_hidden_layers: 2, num_attention_heads: 8,"
        " num_key_value_heads: 2, hidden_size: 64, intermediate_size: 64, vocab_size: 128}\n"
    )
    cfg = load_config(str(path), ["parallel.dp=2", "parallel.tp=2", "parallel.cp=2", "training.seq_len=64"])
    d = dry_run(cfg, 8, rank=0)
    out = capsys.readouterr().out
    assert d.dp == 2 and "world 8 = pp 1 x dp 2 x cp 2" in out and "rank  pp  dp  cp" in out
    assert not dist.is_initialized()
    dry_run(cfg, 8, rank=3)
    assert capsys.readouterr().out == ""  # only rank 0 prints
    bad = load_config(str(path), ["parallel.tp=4", "training.seq_len=64"])
    with pytest.raises(ConfigError, match="parallel.tp: num_key_value_heads=2"):
        dry_run(bad, 4)
    with pytest.raises(ConfigError, match="model.path: cannot load HF config"):
        dry_run(load_config(str(path), ["model.config=null", f"model.path={tmp_path / 'nope'}"]), 1)


# ---- the real mesh on 4 gloo ranks --------------------------------------------------------------------

MESH_CASES = [
    ParallelDims(dp_replicate=1, dp_shard=1, cp=4, tp=1, pp=1, ulysses=2, world_size=4),  # hybrid 2x2
    ParallelDims(dp_replicate=1, dp_shard=2, cp=2, tp=1, pp=1, ulysses=1, world_size=4),  # dp2 x ring2
    ParallelDims(dp_replicate=2, dp_shard=2, cp=1, tp=1, pp=1, ulysses=1, world_size=4),  # HSDP
    ParallelDims(dp_replicate=1, dp_shard=1, cp=2, tp=2, pp=1, ulysses=2, world_size=4),  # ulysses2 x tp2
]


def _mesh_worker(rank: int, world_size: int, cases: list[ParallelDims]) -> list[dict]:
    out = []
    for d in cases:
        mesh = d.build_mesh("cpu")
        names = (*MESH_DIM_NAMES, *FLATTENED_DIMS)
        out.append({n: (*sub_rank_and_size(mesh, n), mesh_ranks(mesh, n)) for n in names})
    return out


def mesh_ranks(mesh, name):
    from parallel.dims import sub_mesh

    return sub_mesh(mesh, name).mesh.flatten().tolist()


def _expected(d: ParallelDims, rank: int) -> dict:
    c = d.coords(rank)
    flat = {
        "dp": (c["dp"], d.dp),
        "cp": (c["cp"], d.cp),
        "dp_shard_cp": (c["dp_shard"] * d.cp + c["cp"], d.dp_shard * d.cp),
        "dp_cp": (c["dp"] * d.cp + c["cp"], d.dp * d.cp),
    }
    plain = {n: (c[n], s) for n, s in zip(MESH_DIM_NAMES, d.sizes)}
    return {**plain, **flat}


def test_build_mesh_matches_coords_on_gloo():
    results = run_distributed(_mesh_worker, 4, MESH_CASES)
    for case, d in enumerate(MESH_CASES):
        for rank in range(4):
            got = results[rank][case]
            want = _expected(d, rank)
            for name, (local, size) in want.items():
                assert got[name][:2] == (local, size), (case, rank, name, got[name], (local, size))
                # members of this rank's group, in group order, are exactly the ranks agreeing on every
                # other coordinate, sorted by their coordinate along `name`
                members = [
                    r for r in range(4)
                    if all(_expected(d, r)[o] == want[o] for o in MESH_DIM_NAMES if o not in _parts(name))
                ]  # fmt: skip
                members.sort(key=lambda r, n=name: _expected(d, r)[n][0])
                assert got[name][2] == members, (case, rank, name)


def _parts(name: str) -> tuple[str, ...]:
    return FLATTENED_DIMS.get(name, (name,))
