"""JAX specifics: where the window state lives and what the compiled step runs.

Run with ``KERAS_BACKEND=jax`` (``tests/test_backend_suites.py`` does).
"""

import keras
import numpy as np
import pytest
from helpers import (
    assert_same_training,
    full_jax_state,
    functional_twins,
    regression_data,
    small_regression_layers,
)

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="JAX backend specifics (KERAS_BACKEND=jax)"
)

K, MICRO = 4, 4


def fitted_model(samples=40, optimizer="adam"):
    x, y = regression_data(samples=samples)
    model, plain = functional_twins(small_regression_layers(), K)
    for m in (model, plain):
        m.compile(optimizer, loss="mse")
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    return model, plain, x, y


def test_the_window_state_travels_with_the_optimizer_state_not_the_weights():
    model, plain, _, _ = fitted_model(samples=40)
    state = model._accumulation_state
    window = state.variables()
    plain.optimizer.build(plain.trainable_variables)
    assert len(model.weights) == len(plain.weights)
    assert len(model.optimizer.variables) == len(plain.optimizer.variables)
    every_model_variable = {
        id(v)
        for v in model.trainable_variables
        + model.non_trainable_variables
        + model.optimizer.variables
        + model.metrics_variables
    }
    assert not any(id(v) in every_model_variable for v in window)
    # The state `fit()` threads through the compiled step carries it.
    threaded = full_jax_state(model)
    optimizer_list = threaded[2]
    assert len(optimizer_list) == len(model.optimizer.variables) + len(window) + 1


def test_the_optimizer_runs_only_in_the_update_branch():
    # Adam's update takes a square root; the forward and backward pass of a
    # tanh network with MSE do not. Outside the `cond` that applies the
    # window, the compiled step must contain no square root.
    import jax

    model, _, x, y = fitted_model(samples=16, optimizer="adam")
    state = full_jax_state(model)
    jaxpr = jax.make_jaxpr(model.train_step)(state, (x[:MICRO], y[:MICRO]))

    def primitives(jaxpr, outside_cond):
        found = []
        for eqn in jaxpr.eqns:
            found.append(eqn.primitive.name)
            if eqn.primitive.name == "cond" and outside_cond:
                continue
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        found += primitives(getattr(inner, "jaxpr", inner), outside_cond)
        return found

    outside = primitives(jaxpr.jaxpr, outside_cond=True)
    everywhere = primitives(jaxpr.jaxpr, outside_cond=False)
    assert outside.count("cond") == 1
    assert "sqrt" not in outside and "rsqrt" not in outside
    assert "sqrt" in everywhere or "rsqrt" in everywhere


def test_train_on_batch_and_save_weights_see_the_synced_window(tmp_path):
    model, _, x, y = fitted_model(samples=16)
    for step in range(3):
        model.train_on_batch(
            x[step * MICRO : (step + 1) * MICRO], y[step * MICRO : (step + 1) * MICRO]
        )
    assert model.pending_micro_steps == 3
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    restored, _ = functional_twins(small_regression_layers(), K)
    restored.compile("adam", loss="mse")
    restored.fit(x[:MICRO], y[:MICRO], epochs=0, verbose=0)
    restored.load_weights(path)
    assert restored.pending_micro_steps == 3


def _in_step_twins(micro_batch_size):
    import accum_keras

    keras.utils.set_random_seed(0)
    in_step = accum_keras.Model(*small_regression_layers()(), micro_batch_size=micro_batch_size)
    plain = keras.Model(*small_regression_layers()())
    plain.set_weights(in_step.get_weights())
    for model in (in_step, plain):
        model.compile(keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    return in_step, plain


def _skip_unless_the_cpu_unrolls():
    import jax

    from accum_keras._backends import jax as jax_backend

    if jax.default_backend() != "cpu":
        pytest.skip("only the CPU unrolls the loop")
    if jax_backend._cpu_split_compiler_options() is None:
        pytest.skip("this jaxlib's XLA has no memory-optimized CPU scheduler: the mode scans")


@pytest.mark.parametrize("unroll_limit", [0, 16], ids=["scanned", "unrolled"])
def test_the_in_step_step_scanned_or_unrolled_is_plain_keras_at_the_fit_batch(
    monkeypatch, unroll_limit
):
    # Batches of 12 in micro-batches of 5 (two full and a remainder of 2),
    # and a short last batch of 6: both forms of the loop must give the big
    # batch's step.
    from accum_keras._backends import jax as jax_backend

    if unroll_limit:
        _skip_unless_the_cpu_unrolls()
    monkeypatch.setattr(jax_backend, "CPU_UNROLL_LIMIT", unroll_limit)
    in_step, plain = _in_step_twins(micro_batch_size=5)
    x, y = regression_data(30)
    histories = [
        model.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0).history
        for model in (in_step, plain)
    ]
    assert_same_training(in_step, plain)
    for name, values in histories[1].items():
        np.testing.assert_allclose(histories[0][name], values, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("unroll_limit, loops", [(3, 0), (2, 1)])
def test_on_a_cpu_the_in_step_loop_is_unrolled_up_to_the_limit(monkeypatch, unroll_limit, loops):
    # XLA's CPU compiler leaves the gradient convolutions of a loop body on
    # its slow path (docs/performance.md): up to CPU_UNROLL_LIMIT full
    # micro-batches the compiled step has no loop, beyond it one.
    import jax

    from accum_keras._backends import jax as jax_backend

    _skip_unless_the_cpu_unrolls()
    monkeypatch.setattr(jax_backend, "CPU_UNROLL_LIMIT", unroll_limit)
    in_step, _ = _in_step_twins(micro_batch_size=2)
    x, y = regression_data(6)
    in_step.train_on_batch(x[:2], y[:2])  # builds the optimizer and window state
    state = full_jax_state(in_step)
    text = jax.jit(in_step.train_step).lower(state, (x, y)).compile().as_text()
    assert text.count(" while(") == loops


def _compiled_temp_bytes(model, x, y, compiler_options):
    import jax

    model.compile(keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x[:4], y[:4])  # builds the optimizer and window state
    state = full_jax_state(model)
    step = jax.jit(model.train_step, compiler_options=compiler_options)
    return step.lower(state, (x, y)).compile().memory_analysis().temp_size_in_bytes


def test_the_unrolled_step_keeps_one_micro_batch_of_a_max_pooling_cnn():
    # Under XLA's default CPU scheduler the unrolled step created the
    # max-pooling gradients' buffers of every micro-batch at its start
    # (docs/performance.md); compiled as the mode's train function compiles
    # it, it stays within the memory test's bound: twice plain Keras at the
    # micro-batch, plus the fit batch's input and one copy of the weights.

    import accum_keras
    from accum_keras._backends import jax as jax_backend

    _skip_unless_the_cpu_unrolls()

    def cnn():
        inputs = keras.Input((16, 16, 3))
        hidden = inputs
        for channels in (4, 8, 16):
            for _ in range(2):
                hidden = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(hidden)
            hidden = keras.layers.MaxPooling2D()(hidden)
        hidden = keras.layers.GlobalAveragePooling2D()(hidden)
        return inputs, keras.layers.Dense(10, activation="softmax")(hidden)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, size=(16,)).astype("int32")
    options = jax_backend._cpu_split_compiler_options()
    keras.utils.set_random_seed(0)
    in_step = accum_keras.Model(*cnn(), micro_batch_size=4)
    in_step_bytes = _compiled_temp_bytes(in_step, x, y, options)
    plain_bytes = _compiled_temp_bytes(keras.Model(*cnn()), x[:4], y[:4], options)
    weight_bytes = sum(int(np.prod(v.shape)) * 4 for v in in_step.trainable_variables)
    assert in_step_bytes <= 2 * plain_bytes + x.nbytes + weight_bytes
