"""JAX specifics: where the window state lives and what the compiled step runs.

Run with ``KERAS_BACKEND=jax`` (``tests/test_backend_suites.py`` does).
"""

import keras
import pytest
from helpers import functional_twins, regression_data, small_regression_layers

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
    threaded = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    optimizer_list = threaded[2]
    assert len(optimizer_list) == len(model.optimizer.variables) + len(window) + 1


def test_the_optimizer_runs_only_in_the_update_branch():
    # Adam's update takes a square root; the forward and backward pass of a
    # tanh network with MSE do not. Outside the `cond` that applies the
    # window, the compiled step must contain no square root.
    import jax

    model, _, x, y = fitted_model(samples=16, optimizer="adam")
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
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
