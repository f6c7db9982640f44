"""``boneage train`` launched by ``torchrun`` on two "nodes" (two torchrun agents on localhost, one process each,
gloo, env:// rendezvous) trains the same model as the single-node two-process run that Catalyst spawns itself:
same world size, ranks, shards and seed, so the same validation numbers; rank 0 alone writes the run folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from boneage.config import load_config
from boneage.data.synth import make_synth_dataset
from boneage.training.runner import train

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")

# validation MAE of the two launches may differ by float reduction order only; in months
TOLERANCE_MONTHS = 1e-3
TINY = ["preprocess.size=64", "model.width=0.5", "train.batch_size=4", "train.epochs=2", "data.val_fraction=0.25",
        "train.num_threads=1", "train.engine=ddp", "train.max_minutes=null", "train.lr_scaling=linear"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


def test_torchrun_on_two_nodes_matches_the_spawned_two_process_run(tmp_path, monkeypatch):
    data = make_synth_dataset(tmp_path / "phantoms", 32, seed=5)
    paths = [f"data.images={data / 'images'}", f"data.labels={data / 'labels.csv'}",
             f"data.cache_dir={tmp_path / 'cache'}"]

    # one node, two processes spawned by Catalyst (train.ddp_workers=2); it also builds the cache both reuse
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    spawned = train(load_config("bonenet-s", [*paths, *TINY, "train.ddp_workers=2"]), tmp_path / "spawned",
                    workers=1)

    # two nodes of one process each, as on two machines: `torchrun --nnodes 2 --node_rank i`, rank 0's host as
    # master; ddp_workers says 1 on purpose: under a launcher the world size comes from the launcher
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    run = tmp_path / "torchrun"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "boneage", "train", "--config", "bonenet-s", "--out", str(run), "--workers", "1",
         *paths, *TINY, "train.ddp_workers=1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)

    launched = json.loads((run / "metrics.json").read_text())
    assert launched["world_size"] == spawned["world_size"] == 2
    assert all(h["train"]["ranks"] == 2 and h["valid"]["ranks"] == 2 for h in launched["history"])
    for ours, theirs in zip(launched["history"], spawned["history"], strict=True):
        assert ours["train"]["n"] == theirs["train"]["n"]  # the same shards: batch_size x 2 processes per step
        assert ours["valid"]["n"] == theirs["valid"]["n"] == spawned["target"]["n_valid"]
        assert ours["valid"]["mae_months"] == pytest.approx(theirs["valid"]["mae_months"], abs=TOLERANCE_MONTHS)
        assert ours["train"]["loss"] == pytest.approx(theirs["train"]["loss"], abs=1e-5)
    assert launched["best"]["mae_months"] == pytest.approx(spawned["best"]["mae_months"], abs=TOLERANCE_MONTHS)
    print("validation MAE per epoch, torchrun 2 nodes vs spawned 2 processes:",
          [(h["valid"]["mae_months"], g["valid"]["mae_months"]) for h, g in zip(launched["history"],
                                                                                spawned["history"])])
    # rank 0 alone wrote the run folder (rank 1, "on another node", wrote nothing into the shared --out)
    expected = ["best.pt", "config.yaml", "last.pt", "logs", "metrics.json", "tensorboard"]
    assert _files(run) == _files(tmp_path / "spawned") == expected
    assert "best validation mae_months" in outputs[0] and "best validation mae_months" in outputs[1]


def _launcher_env(monkeypatch, world: int, rank: int, local: int, local_world: int) -> None:
    for key, value in {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": local_world,
                       "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": 29555}.items():
        monkeypatch.setenv(key, str(value))


def test_under_a_launcher_ddp_joins_with_the_launchers_world_and_ranks(monkeypatch):
    """torchrun's env (here: 2 nodes x 4 processes, the second process of node 1 = global rank 5): the engine takes
    the world size and ranks from it, spawns nothing and runs the experiment in this process."""
    from boneage.training.components import LaunchedDDPEngine, SpawningDDPEngine, build_engine

    _launcher_env(monkeypatch, world=8, rank=5, local=1, local_world=4)
    engine = build_engine(load_config("bonenet-s", ["train.engine=ddp", "train.ddp_workers=2"]))
    assert isinstance(engine, LaunchedDDPEngine)
    assert engine._world_size == 8 and engine._workers_global_rank + 1 == 5 and engine._num_local_workers == 4
    assert engine._address == "10.0.0.7" and str(engine._port) == "29555"
    assert engine.spawn(lambda local_rank, world_size: (local_rank, world_size)) == (1, 8)  # here, not spawned
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    assert isinstance(build_engine(load_config("bonenet-s", ["train.engine=ddp"])), SpawningDDPEngine)


def test_under_a_launcher_another_engine_is_refused(monkeypatch, tmp_path):
    from boneage.errors import ConfigError

    _launcher_env(monkeypatch, world=2, rank=1, local=0, local_world=1)
    cfg = load_config("bonenet-s", [f"data.images={tmp_path}", f"data.labels={tmp_path / 'labels.csv'}"])
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but train.engine=auto: pass --engine ddp"):
        train(cfg, tmp_path / "run")  # before any work
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a launcher with one process: any engine
    from boneage.training.components import check_launch

    check_launch(cfg)
