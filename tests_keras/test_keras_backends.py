"""The same Keras Ano on Keras's other backends, each in its own process (``KERAS_BACKEND``).

On the PyTorch backend it is also compared with the project's PyTorch ``Ano`` on the same
gradients. TensorFlow, the backend of this test process, is covered by the other test files.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from keras_helpers import run_python, subprocess_env

_SCRIPT = """
import json, sys
import numpy as np
import keras

backend = sys.argv[1]
assert keras.backend.backend() == backend, keras.backend.backend()
sys.path.insert(0, "tests_keras")
from keras_helpers import ano_reference, run_keras_optimizer
from ano_optimizer.keras import Ano

CASES = {
    "ano": dict(lr=1e-3, betas=(0.92, 0.99), eps=1e-8, weight_decay=0.0, logarithmic_schedule=False),
    "anolog-wd": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, logarithmic_schedule=True),
}
rng = np.random.default_rng(0)
param0 = rng.standard_normal((4, 5))
grads = rng.standard_normal((8, 4, 5))
grads[rng.random(grads.shape) < 0.2] = 0.0
has = np.ones(8, dtype=bool)
report = {}
for name, h in CASES.items():
    optimizer = Ano(learning_rate=h["lr"], beta_1=h["betas"][0], beta_2=h["betas"][1],
                    epsilon=h["eps"], weight_decay=h["weight_decay"],
                    logarithmic_schedule=h["logarithmic_schedule"])
    (trajectory,), _, _ = run_keras_optimizer(optimizer, [param0], [grads], [has])
    oracle, _, _, _ = ano_reference(param0, grads, has, **h)
    report[name] = {"vs_oracle": float(np.abs(trajectory - oracle).max())}
    if backend == "torch":
        import torch
        from ano_optimizer import Ano as TorchAno

        p = torch.tensor(param0, dtype=torch.float32, requires_grad=True)
        torch_optimizer = TorchAno([p], lr=h["lr"], betas=h["betas"], eps=h["eps"],
                                   weight_decay=h["weight_decay"],
                                   logarithmic_schedule=h["logarithmic_schedule"])
        torch_trajectory = []
        for g in grads:
            p.grad = torch.tensor(g, dtype=torch.float32)
            torch_optimizer.step()
            torch_trajectory.append(p.detach().numpy().copy())
        report[name]["vs_torch"] = float(np.abs(trajectory - np.stack(torch_trajectory)).max())

x = rng.standard_normal((64, 3)).astype("float32")
y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
model.compile(optimizer="anolog", loss="mse")
history = model.fit(x, y, batch_size=16, epochs=5, verbose=0)
report["fit"] = {
    "class": type(model.optimizer).__name__,
    "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    "losses": history.history["loss"],
}
print("REPORT" + json.dumps(report))
"""


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_keras_backend_matches_the_oracle(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed, so neither is Keras's {backend} backend")
    output = run_python(_SCRIPT, backend, env=subprocess_env(backend), timeout=240)
    report = json.loads(output.split("REPORT", 1)[1])
    for case in ("ano", "anolog-wd"):
        assert report[case]["vs_oracle"] < 3e-6, report
        if backend == "torch":
            assert report[case]["vs_torch"] < 3e-6, report
    assert report["fit"]["class"] == "Anolog"
    assert report["fit"]["iterations"] == 20
    losses = report["fit"]["losses"]
    assert losses[-1] < losses[0], losses
