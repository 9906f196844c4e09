"""Ano in a custom loop under ``MultiWorkerMirroredStrategy``: 2 worker processes on 127.0.0.1.

The two workers' all-reduce sums two numbers per coordinate, which does not depend on the order,
so the result is compared bitwise with one process applying the summed per-half gradients.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from keras_helpers import subprocess_env

WORKER = Path(__file__).with_name("multiworker_train.py")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_multiworker_mirrored_custom_loop_equals_one_process(tmp_path):
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    ports = ",".join(str(port) for port in _free_ports(2))
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--ports",
                ports,
                "--index",
                str(i),
                "--out",
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=240)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for index, (worker, output) in enumerate(zip(workers, outputs, strict=True)):
        assert worker.returncode == 0, f"worker {index} failed:\n{output[-5000:]}"

    report = json.loads((tmp_path / "multiworker.json").read_text())
    assert report["replicas"] == 2
    assert report["iterations"] == 6
    for initial, distributed, single in zip(
        report["initial"], report["distributed"], report["single"], strict=True
    ):
        initial, distributed, single = map(np.asarray, (initial, distributed, single))
        assert np.abs(distributed - initial).max() > 1e-2  # trained, so equality means something
        np.testing.assert_array_equal(distributed, single)
