"""``micro_batch_size`` under JAX's distribution API on eight host devices.

JAX must see eight CPU devices before it starts, so this runs in its own
process, started by `tests/test_jax_distribution.py`, which makes the
assertions. Prints one JSON line with, per case (`DataParallel` over the
eight devices; `ModelParallel` on a 2 x 4 mesh with sharded kernels; each
with a fit batch that ``micro_batch_size`` divides and one that leaves a
remainder): the relative weight difference to plain Keras fit on the same
batches under the same distribution, both update counts and logged losses,
the variables' and accumulators' layouts, and the collectives of the
compiled in-step train step (kind and result shape, from its HLO text) with
the shapes of its inputs; and for `AccumBatchNormalization` under
`DataParallel` with a remainder, the weight difference to plain Keras fed
the documented micro-batches normalized by hand.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()


import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import accum_keras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import compiled_collectives, max_relative_difference, split_rows_by_shard  # noqa: E402

FEATURES, OUTPUTS = 12, 24


def spec(variable) -> list:
    entries = list(variable.value.sharding.spec)
    entries += [None] * (len(variable.shape) - len(entries))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def build(micro_batch_size, optimizer):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(40, activation="tanh")(inputs)
    outputs = keras.layers.Dense(OUTPUTS)(hidden)
    if micro_batch_size is None:
        model = keras.Model(inputs, outputs)
    else:
        model = accum_keras.Model(inputs, outputs, micro_batch_size=micro_batch_size)
    model.compile(optimizer(), loss="mse")
    return model


def run(name, distribution, samples, batch, micro, optimizer, epochs=2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    y = rng.normal(size=(samples, OUTPUTS)).astype("float32")
    with distribution.scope():
        in_step, plain = build(micro, optimizer), build(None, optimizer)
        plain.set_weights(in_step.get_weights())
        histories = [
            model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0).history
            for model in (in_step, plain)
        ]
        state = in_step._accumulation_state
        result = {
            "difference": max_relative_difference(in_step.get_weights(), plain.get_weights()),
            "updates": int(in_step.optimizer.iterations.numpy()),
            "reference_updates": int(plain.optimizer.iterations.numpy()),
            "loss": histories[0]["loss"],
            "reference_loss": histories[1]["loss"],
            "variable_specs": [spec(v) for v in state.accumulated_variables],
            "accumulator_specs": [spec(a) for a in state.gradients],
            "input_shapes": [
                f"{batch},{FEATURES}",
                f"{batch},{OUTPUTS}",
                f"{micro},{FEATURES}",
                f"{micro},{OUTPUTS}",
            ],
            "remainder": batch % micro,
            "collectives": compiled_collectives(
                in_step.train_step, in_step, distribution, (x[:batch], y[:batch])
            ),
            "plain_collectives": compiled_collectives(
                plain.train_step, plain, distribution, (x[:batch], y[:batch])
            ),
        }
    return name, result


def data_parallel_case():
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    # 80 samples: batches of 32 and a short last one of 16; micro-batches of
    # 8, one row per device each.
    # SGD: the devices' partial sums are added in another order than plain
    # Keras adds them, and Adam turns that round-off of near-zero gradient
    # entries into 1e-5 differences (measured: 7.9e-6 relative).
    optimizer = lambda: keras.optimizers.SGD(0.1, momentum=0.9)  # noqa: E731
    return run("data_parallel", distribution, samples=80, batch=32, micro=8, optimizer=optimizer)


def _model_parallel() -> keras.distribution.ModelParallel:
    """Dense kernels and biases split over 4 devices, the batch over 2."""
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense.*kernel"] = (None, "model")
    layout_map[".*dense.*bias"] = ("model",)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def model_parallel_case():
    optimizer = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
    return run(
        "model_parallel", _model_parallel(), samples=56, batch=16, micro=4, optimizer=optimizer
    )


def data_parallel_remainder_case():
    # Batches of 40: two micro-batches of 16 (two rows from each device) and
    # a remainder of 8 (one row from each).
    optimizer = lambda: keras.optimizers.SGD(0.1, momentum=0.9)  # noqa: E731
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    return run("data_parallel_remainder", distribution, 80, 40, 16, optimizer=optimizer, epochs=1)


def model_parallel_remainder_case():
    # The batch axis has 2 devices: batches of 10 are two micro-batches of 4
    # (two rows from each half of the mesh) and a remainder of 2 (one each).
    optimizer = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
    return run("model_parallel_remainder", _model_parallel(), 30, 10, 4, optimizer, epochs=1)


class Affine(keras.layers.Layer):
    """BatchNormalization's output on inputs normalized beforehand: ``x * gamma + beta``."""

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=input_shape[-1:], name="gamma", initializer="ones")
        self.beta = self.add_weight(shape=input_shape[-1:], name="beta", initializer="zeros")

    def call(self, inputs):
        return inputs * self.gamma + self.beta


def _fed_by_hand(x, y, batch, micro, shards, epsilon):
    """``(x, y)`` with every batch's micro-batches (the split rule for ``shards``)
    normalized by their own statistics, as BatchNormalization normalizes them."""
    inputs, labels = [], []
    for start in range(0, len(x), batch):
        for rows in split_rows_by_shard(np.arange(start, start + batch), micro, shards):
            part = x[rows].astype("float64")
            inputs.append((part - part.mean(axis=0)) / np.sqrt(part.var(axis=0) + epsilon))
            labels.append(y[rows])
    return np.concatenate(inputs).astype("float32"), np.concatenate(labels)


def data_parallel_batch_norm_case():
    """AccumBatchNormalization on the inputs, batches of 40 in micro-batches of 16.

    It normalizes each micro-batch by its own statistics, so the trained
    weights tell which rows shared a micro-batch. The reference is plain
    Keras fed each micro-batch of the documented split (per device, 8 shards)
    normalized by hand; ``unsharded_rule_difference`` is the distance to the
    same reference with the split that ignores the shards.
    """
    samples, batch, micro = 80, 40, 16
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(samples, FEATURES)) * 3.0 + 1.0).astype("float32")
    y = rng.normal(size=(samples, OUTPUTS)).astype("float32")
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    optimizer = lambda: keras.optimizers.SGD(0.1, momentum=0.9)  # noqa: E731

    def build(first_layer, model_class, **kwargs):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((FEATURES,))
        hidden = keras.layers.Dense(40, activation="tanh")(first_layer(inputs))
        model = model_class(inputs, keras.layers.Dense(OUTPUTS)(hidden), **kwargs)
        model.compile(optimizer(), loss="mse")
        return model

    with distribution.scope():
        norm = accum_keras.layers.AccumBatchNormalization()
        in_step = build(norm, accum_keras.Model, micro_batch_size=micro)
        initial = [norm.gamma.numpy(), norm.beta.numpy()] + in_step.get_weights()[-4:]
        in_step.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        trained = [norm.gamma.numpy(), norm.beta.numpy()] + in_step.get_weights()[-4:]
        differences = []
        for shards in (len(jax.devices()), 1):
            reference = build(Affine(), keras.Model)
            reference.set_weights(initial)
            fed = _fed_by_hand(x, y, batch, micro, shards, norm.epsilon)
            reference.fit(*fed, batch_size=batch, epochs=1, shuffle=False, verbose=0)
            differences.append(max_relative_difference(trained, reference.get_weights()))
    return "data_parallel_batch_norm", {
        "updates": int(in_step.optimizer.iterations.numpy()),
        "difference": differences[0],
        "unsharded_rule_difference": differences[1],
    }


cases = dict(
    [
        data_parallel_case(),
        model_parallel_case(),
        data_parallel_remainder_case(),
        model_parallel_remainder_case(),
        data_parallel_batch_norm_case(),
    ]
)
print(json.dumps({"devices": len(jax.devices()), "cases": cases}))
