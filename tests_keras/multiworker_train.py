"""A custom Keras training loop with Ano under ``tf.distribute.MultiWorkerMirroredStrategy``.

Run once per worker, each with its own index (``TF_CONFIG`` is set from the arguments):

    python multiworker_train.py --ports 12345,12346 --index 0 --out DIR &
    python multiworker_train.py --ports 12345,12346 --index 1 --out DIR

Each worker trains on its half of every global batch; ``apply_gradients`` all-reduces (sums) the
gradients across the workers, then each applies the same Ano update. Worker 0 then repeats the
training in one process on the summed per-half gradients and writes both results.
"""

import argparse
import json
import os
from pathlib import Path

STEPS, PER_WORKER, WORKERS = 6, 4, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", required=True, help="comma-separated, one per worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    workers = [f"127.0.0.1:{port}" for port in args.ports.split(",")]
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": args.index}}
    )

    import keras
    import numpy as np
    import tensorflow as tf

    from ano_optimizer.keras import Ano

    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TF op
    global_batch = PER_WORKER * WORKERS
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((STEPS, global_batch, 5)).astype("float32")
    ys = rng.standard_normal((STEPS, global_batch, 3)).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)]
        )
        optimizer = Ano(learning_rate=3e-2, beta_1=0.9, beta_2=0.99, weight_decay=0.1)
        optimizer.build(model.trainable_variables)  # variables exist before the traced step
        return model, optimizer

    def loss_of(model, x, y):
        # Sum over this worker's rows, divided by the global batch: the sum over workers is the
        # global mean, which is why the gradients are summed and not averaged.
        return tf.reduce_sum(tf.square(model(x) - y)) / global_batch

    with strategy.scope():
        model, optimizer = build()

    @tf.function
    def distributed_step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_of(model, x, y)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

        strategy.run(replica_step, args=(x, y))

    rows = slice(args.index * PER_WORKER, (args.index + 1) * PER_WORKER)
    for step in range(STEPS):
        distributed_step(tf.constant(xs[step, rows]), tf.constant(ys[step, rows]))
    distributed = [np.asarray(w).tolist() for w in model.get_weights()]
    if args.index != 0:
        return

    single, single_optimizer = build()
    initial = [np.asarray(w).tolist() for w in single.get_weights()]

    @tf.function  # traced like the distributed step, so both run the same kernels
    def single_step(x, y):
        halves = []
        for worker in range(WORKERS):
            part = slice(worker * PER_WORKER, (worker + 1) * PER_WORKER)
            with tf.GradientTape() as tape:
                loss = loss_of(single, x[part], y[part])
            halves.append(tape.gradient(loss, single.trainable_variables))
        summed = [a + b for a, b in zip(*halves, strict=True)]
        single_optimizer.apply_gradients(zip(summed, single.trainable_variables, strict=True))

    for step in range(STEPS):
        single_step(tf.constant(xs[step]), tf.constant(ys[step]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multiworker.json").write_text(
        json.dumps(
            {
                "replicas": strategy.num_replicas_in_sync,
                "iterations": int(optimizer.iterations.numpy()),
                "initial": initial,
                "distributed": distributed,
                "single": [np.asarray(w).tolist() for w in single.get_weights()],
            }
        )
    )


if __name__ == "__main__":
    main()
