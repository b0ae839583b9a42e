"""Two gloo processes under torchrun train to the same weights as one process (same global batch, seed)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.train import TrainConfig, fit
from torchslim.train import distributed as tsdist

SCRIPT = Path(__file__).with_name("_ddp_script.py")


def _script():
    spec = importlib.util.spec_from_file_location("_ddp_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # Seen only in full CI runs on a saturated 2-core machine: a rank aborts in C++ teardown
        # (SIGABRT) although the same launch passes alone. Retried once, on a fresh port; any other
        # failure, or the same abort twice, fails the test.
        cmd[cmd.index("--master_port") + 1] = str(_free_port())
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = _script().run(tmp_path, "off")
    for name in ("fit", "distill", "resumed"):
        ddp = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert ddp.keys() == single[name].keys()
        for key in ddp:
            torch.testing.assert_close(ddp[key], single[name][key], rtol=0, atol=1e-5, msg=f"{name}: {key}")
    # training really moved the weights (the comparison is not between two initial states)
    assert not torch.allclose(single["fit"]["0.weight"], _script().make_model(1)[0].weight)
    # the checkpoint was written by rank 0 only, under the plain (unwrapped) parameter names
    saved = torch.load(tmp_path / "ckpt-ddp" / "last.pt", weights_only=True)
    assert set(saved["model"]) == set(single["fit"]) and [p.name for p in (tmp_path / "ckpt-ddp").iterdir()] == ["last.pt"]


def test_sampler_shards_the_one_process_batches():
    from torch.utils.data import TensorDataset

    from torchslim.data import DataBundle
    from torchslim.train.loop import _epoch_seed

    rows = TensorDataset(torch.arange(24), torch.zeros(24, dtype=torch.long))
    bundle = DataBundle("idx", "idx", rows, rows, rows, (1,), 1, True)
    env0, env1 = tsdist.DistEnv(0, 2, 0), tsdist.DistEnv(1, 2, 0)
    for epoch in (0, 3):
        one = [x for x, _ in bundle.loader("train", 8, shuffle=True, seed=_epoch_seed(5, epoch))]
        shards = [[x for x, _ in tsdist.shard_loader(rows, 8, 5, epoch, e)] for e in (env0, env1)]
        assert len(shards[0]) == len(shards[1]) == len(one) == 3
        for step, (a, b) in enumerate(zip(*shards)):
            assert len(a) == len(b) == 4
            assert sorted(torch.cat([a, b]).tolist()) == sorted(one[step].tolist())


def test_distributed_modes_and_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert tsdist.setup("auto", torch.device("cpu")) is None
    assert tsdist.setup(False, torch.device("cpu")) is None
    with pytest.raises(ConfigError, match="torchrun"):
        tsdist.setup("ddp", torch.device("cpu"))
    with pytest.raises(ConfigError, match="distributed must be"):
        tsdist.setup("many", torch.device("cpu"))
    with pytest.raises(ConfigError, match="divide by the 3 processes"):
        tsdist.per_process_batch(16, tsdist.DistEnv(0, 3, 0))
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        tsdist.from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    data = _script().make_data()
    with pytest.raises(ConfigError, match="torchrun"):
        fit(_script().make_model(0), data, TrainConfig(epochs=1, device="cpu"), progress=False, distributed=True)
