"""Sharded training on forced CPU devices and across two processes, against the single-device step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")


def test_meshes_match_single_device(tiny_models, tmp_path):
    """With 8 CPU devices, meshes (2,4,1), (1,8,1) and (1,4,2) give the single-device losses and updates."""
    out = tmp_path / "meshes.json"
    subprocess.run([sys.executable, WORKER, "meshes", tiny_models["llama"][0], str(out)], check=True, timeout=600)
    results = json.loads(out.read_text())
    assert len(results) == 6
    for name, r in results.items():
        assert r["loss_diff"] <= 1e-5, (name, r)
        assert r["param_diff"] <= 1e-5, (name, r)
        assert r["shardings_ok"], name
        assert r["n_sharded_leaves"] > 0, name  # the trainable tree really is split over devices


def test_two_processes_match_single_process(tiny_models, tmp_path):
    """Two processes on 127.0.0.1 (gloo, 2 CPU devices each) run 3 steps together: same losses as one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    model_dir = tiny_models["llama"][0]
    multi, single = tmp_path / "multi.json", tmp_path / "single.json"
    env = {**os.environ, "XLA_FLAGS": ""}
    procs = [
        subprocess.Popen([sys.executable, WORKER, "process", model_dir, str(multi), str(pid), "2", port], env=env)
        for pid in range(2)
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port1 = str(s.getsockname()[1])
    subprocess.run(
        [sys.executable, WORKER, "process", model_dir, str(single), "0", "1", port1], env=env, check=True, timeout=600
    )
    multi_r, single_r = json.loads(multi.read_text()), json.loads(single.read_text())
    assert multi_r["devices"] == 4 and single_r["devices"] == 2
    assert multi_r["shardings_ok"]
    np.testing.assert_allclose(multi_r["losses"], single_r["losses"], rtol=0, atol=1e-5)
    assert multi_r["losses"][-1] < multi_r["losses"][0]
