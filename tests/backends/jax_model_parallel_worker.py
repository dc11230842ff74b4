"""Accumulation under `keras.distribution.ModelParallel` on eight host devices.

JAX must see eight CPU devices before it starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and the backend is
fixed at import, so this runs in its own process, started by
`tests/test_jax_distribution.py`, which makes the assertions.

Prints one JSON line with, for each case (a functional model with a
`LayoutMap`; a KerasHub Gemma causal LM with its backbone's
``get_layout_map``, fully trainable and with LoRA), per trainable variable:
its layout and its accumulator's, the per-device bytes of the weights, of
Adam's slots and of the accumulators; the relative weight difference to
plain Keras trained on the big batch under the same distribution; and the
result shapes of the all-gathers in the compiled train steps of both
models. Last, ``randomized_state_machine``: the randomized window test run
under DataParallel and ModelParallel (tests/distributed_state_machine.py).
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
import distributed_state_machine  # noqa: E402
from helpers import compiled_collectives, max_relative_difference  # noqa: E402

K = 4
MESH_SHAPE = (2, 4)


def mesh():
    return keras.distribution.DeviceMesh(MESH_SHAPE, ("batch", "model"), jax.devices())


def per_device_bytes(variable) -> int:
    return int(variable.value.addressable_shards[0].data.nbytes)


def spec(variable) -> list:
    # Trailing `None`s are implied: P(None, 'model') and P(None, 'model', None)
    # lay out a 3-D array alike.
    entries = list(variable.value.sharding.spec)
    entries += [None] * (len(variable.shape) - len(entries))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def layouts(model) -> dict:
    state = model._accumulation_state
    slots = [v for v in model.optimizer.variables if v.path.endswith(("_momentum", "_velocity"))]
    return {
        "variables": [v.path for v in state.accumulated_variables],
        "trainable": [v.path for v in model.trainable_variables],
        "variable_specs": [spec(v) for v in state.accumulated_variables],
        "accumulator_specs": [spec(a) for a in state.gradients],
        "weight_bytes": sum(per_device_bytes(v) for v in model.trainable_variables),
        "adam_slot_bytes": sum(per_device_bytes(v) for v in slots),
        "accumulator_bytes": sum(per_device_bytes(a) for a in state.gradients),
        "sharded_variables": sum(
            any(e is not None for e in spec(v)) for v in state.accumulated_variables
        ),
    }


def collectives(accumulating, plain, distribution, batch) -> dict:
    """The collectives of plain Keras' step and of the accumulating model's two programs.

    ``accumulate`` is what runs on the micro-batches that cannot close their
    window (`accum_keras._backends.jax.make_train_function`), ``apply`` the
    one that may apply it.
    """
    from accum_keras._backends import jax as jax_backend

    def accumulate(state, data):
        return jax_backend.train_step(accumulating, state, data, may_apply=False)

    return {
        "plain": compiled_collectives(plain.train_step, plain, distribution, batch),
        "accumulate": compiled_collectives(accumulate, accumulating, distribution, batch),
        "apply": compiled_collectives(accumulating.train_step, accumulating, distribution, batch),
    }


def twins(build, accumulation_steps):
    accumulating = build(accumulation_steps)
    plain = build(None)
    plain.set_weights(accumulating.get_weights())
    return accumulating, plain


def run(name, distribution, build, data, micro, batch=None):
    with distribution.scope():
        accumulating, plain = twins(build, K)
        accumulating.fit(**data, batch_size=micro, epochs=2, shuffle=False, verbose=0)
        plain.fit(**data, batch_size=micro * K, epochs=2, shuffle=False, verbose=0)
        result = layouts(accumulating)
        result.update(
            difference=max_relative_difference(accumulating.get_weights(), plain.get_weights()),
            updates=int(accumulating.optimizer.iterations.numpy()),
            reference_updates=int(plain.optimizer.iterations.numpy()),
            # As the HLO text writes them, in the order of `accumulator_specs`.
            accumulator_shapes=[
                ",".join(map(str, a.shape)) for a in accumulating._accumulation_state.gradients
            ],
        )
        if batch is not None:
            result["collectives"] = collectives(accumulating, plain, distribution, batch)
    return name, result


# -- a functional model --------------------------------------------------------


def functional_case():
    layout_map = keras.distribution.LayoutMap(mesh())
    layout_map[".*dense.*kernel"] = (None, "model")
    layout_map[".*dense.*bias"] = ("model",)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")

    def build(accumulation_steps):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((12,))
        hidden = keras.layers.Dense(40, activation="tanh")(inputs)
        outputs = keras.layers.Dense(24)(hidden)
        if accumulation_steps is None:
            model = keras.Model(inputs, outputs)
        else:
            model = accum_keras.Model(inputs, outputs, accumulation_steps=accumulation_steps)
        model.compile(keras.optimizers.Adam(0.01), loss="mse")
        return model

    rng = np.random.default_rng(0)
    # 56 samples: windows of 32 then 24, the last one short.
    x = rng.normal(size=(56, 12)).astype("float32")
    y = rng.normal(size=(56, 24)).astype("float32")
    return run("functional", distribution, build, dict(x=x, y=y), micro=8, batch=(x[:8], y[:8]))


# -- AccumBatchNormalization under a LayoutMap key that matches it ----------------

BN_KEYS = {"broad": ".*bn.*", "narrow": ".*bn/moving_mean"}


def batch_norm_case(name):
    """The layouts of a BatchNorm layer's window statistics, and one window's statistics.

    A `LayoutMap` key ``("model",)`` that matches the layer (``broad``: all
    its variables; ``narrow``: its moving mean only); the layer is made
    directly and by `convert_batch_normalization`, under the distribution.
    Zero learning rate: the one window of 4 micro-batches of 8 and plain
    BatchNormalization's batch of 32 see the same inputs.
    """
    layout_map = keras.distribution.LayoutMap(mesh())
    layout_map[BN_KEYS[name]] = ("model",)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    rng = np.random.default_rng(0)
    x = rng.normal(loc=1.0, scale=2.0, size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")

    def layers(norm):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        hidden = norm(momentum=0.5, name="bn")(keras.layers.Dense(8)(inputs))
        return inputs, keras.layers.Dense(1)(hidden)

    def statistics(model):
        bn = model.get_layer("bn")
        return [bn.moving_mean.numpy(), bn.moving_variance.numpy()]

    def specs(model):
        bn = model.get_layer("bn")
        return {v.path.split("/")[-1]: spec(v) for v in bn.weights + bn.window_variables}

    try:
        with distribution.scope():
            accumulating = accum_keras.Model(
                *layers(accum_keras.layers.AccumBatchNormalization), accumulation_steps=K
            )
            plain = keras.Model(*layers(keras.layers.BatchNormalization))
            plain.set_weights(accumulating.get_weights())
            converted = accum_keras.layers.convert_batch_normalization(plain)
            for model in (accumulating, plain):
                model.compile(keras.optimizers.SGD(0.0), loss="mse")
            accumulating.fit(x, y, batch_size=8, shuffle=False, verbose=0)
            plain.fit(x, y, batch_size=8 * K, shuffle=False, verbose=0)
            return f"batch_norm_{name}", {
                "specs": specs(accumulating),
                "converted_specs": specs(converted),
                "difference": max_relative_difference(statistics(accumulating), statistics(plain)),
                "moved": max_relative_difference(statistics(plain), [np.zeros(8), np.ones(8)]),
            }
    except Exception as error:  # reported, so that the other cases still run
        return f"batch_norm_{name}", {"error": repr(error)[-2000:]}


# -- a KerasHub causal LM --------------------------------------------------------

VOCABULARY, SEQUENCE, MICRO = 64, 8, 4


def gemma_case(lora_rank=None):
    import keras_hub

    backbone_class = keras_hub.models.GemmaBackbone
    layout_map = backbone_class.get_layout_map(mesh())
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")

    class AccumGemmaCausalLM(accum_keras.AccumulatingModel, keras_hub.models.GemmaCausalLM):
        pass

    def build(accumulation_steps):
        keras.utils.set_random_seed(0)
        backbone = backbone_class(
            vocabulary_size=VOCABULARY,
            num_layers=1,
            num_query_heads=4,
            num_key_value_heads=4,
            hidden_dim=16,
            intermediate_dim=32,
            head_dim=8,
        )
        if lora_rank is not None:
            backbone.enable_lora(lora_rank)
        if accumulation_steps is None:
            model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
        else:
            model = AccumGemmaCausalLM(
                backbone=backbone, preprocessor=None, accumulation_steps=accumulation_steps
            )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
        return model

    rng = np.random.default_rng(0)
    samples = 2 * K * MICRO
    ids = rng.integers(1, VOCABULARY, size=(samples, SEQUENCE)).astype("int32")
    lengths = rng.integers(3, SEQUENCE + 1, size=samples)
    mask = np.arange(SEQUENCE)[None, :] < lengths[:, None]
    ids = np.where(mask, ids, 0)
    x = {"token_ids": ids, "padding_mask": mask}
    y = np.roll(ids, -1, axis=1)
    # Per-token masked loss: the micro-batches' divisors differ.
    weights = (mask & np.roll(mask, -1, axis=1)).astype("float32")
    name = "gemma" if lora_rank is None else "gemma_lora"
    data = dict(x=x, y=y, sample_weight=weights)
    result = run(name, distribution, build, data, micro=MICRO)
    if lora_rank is not None:
        result[1]["lora_variables"] = sum("lora" in path for path in result[1]["trainable"])
    return result


cases = [functional_case(), *(batch_norm_case(name) for name in BN_KEYS)]
if "--no-keras-hub" not in sys.argv:
    cases += [gemma_case(), gemma_case(lora_rank=2)]
# The randomized window test under DataParallel and ModelParallel (last: it
# sets the distribution of its own examples).
cases.append(("randomized_state_machine", distributed_state_machine.run()))
print(json.dumps({"devices": len(jax.devices()), "cases": dict(cases)}))
