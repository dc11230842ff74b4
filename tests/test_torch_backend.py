"""PyTorch specifics: no device synchronization per micro-batch, ``.grad`` as accumulator.

Run with ``KERAS_BACKEND=torch`` (``tests/test_backend_suites.py`` does).
"""

import os

import keras
import numpy as np
import pytest
from helpers import assert_same_training, functional_twins, regression_data, small_regression_layers

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="PyTorch backend specifics (KERAS_BACKEND=torch)"
)

K, MICRO = 4, 4

# Tensor methods that copy a device value to the host (and so wait for the
# device): what a Python `if` on a tensor calls.
SYNCING_METHODS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
)


def compiled_model(k=K):
    model, plain = functional_twins(small_regression_layers(), k)
    for m in (model, plain):
        m.compile(keras.optimizers.Adam(0.01), loss="mse")
    return model, plain


def count_host_reads(monkeypatch):
    import torch

    counts = {}
    for name in SYNCING_METHODS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_micro_steps_do_not_read_device_values(monkeypatch):
    x, y = regression_data(samples=64)
    model, _ = compiled_model()
    model.fit(x[:MICRO], y[:MICRO], batch_size=MICRO, epochs=0, verbose=0)
    model.make_train_function()
    batches = [
        (
            keras.ops.convert_to_tensor(x[i : i + MICRO]),
            keras.ops.convert_to_tensor(y[i : i + MICRO]),
        )
        for i in range(0, 64, MICRO)
    ]
    model.train_function([batches[0]])  # the first step reads the counter once
    counts = count_host_reads(monkeypatch)
    for batch in batches[1:11]:  # 10 micro-steps, 2 of them close a window
        model.train_function([batch])
    monkeypatch.undo()
    assert counts == {}
    assert model.pending_micro_steps == 3
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2


def test_backward_adds_into_the_saved_accumulators_and_leaves_grad_empty():
    x, y = regression_data(samples=12)
    model, _ = compiled_model()
    model.fit(x[:MICRO], y[:MICRO], batch_size=MICRO, epochs=0, verbose=0)
    state = model._accumulation_state
    written = []
    hooks = [
        v.value.register_post_accumulate_grad_hook(lambda p: written.append(p.grad.data_ptr()))
        for v in model.trainable_variables
    ]
    try:
        for step in range(3):
            batch = slice(step * MICRO, (step + 1) * MICRO)
            model.train_on_batch(x[batch], y[batch])
    finally:
        for hook in hooks:
            hook.remove()
    accumulators = {a.value.data_ptr() for a in state.gradients}
    assert len(written) == 3 * len(model.trainable_variables)
    assert set(written) == accumulators
    assert all(v.value.grad is None for v in model.trainable_variables)
    assert model.pending_micro_steps == 3
    assert all(float(np.abs(a.numpy()).max()) > 0 for a in state.gradients)


def test_a_host_counter_that_was_loaded_mid_window_is_re_read(tmp_path):
    # Save after 2 micro-steps, train 1 more, load the save: the next fit
    # must continue the loaded window (2 pending), not the host's (3).
    x, y = regression_data(samples=64)
    model, _ = compiled_model()
    model.fit(x[:MICRO], y[:MICRO], batch_size=MICRO, epochs=0, verbose=0)
    for step in range(2):
        model.train_on_batch(
            x[step * MICRO : (step + 1) * MICRO], y[step * MICRO : (step + 1) * MICRO]
        )
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    model.train_on_batch(x[8:12], y[8:12])
    model.load_weights(path)
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(self.model.pending_micro_steps)

    with pytest.warns(UserWarning, match="2 micro-batch\\(es\\) pending in an open window"):
        model.fit(x[8:24], y[8:24], batch_size=MICRO, shuffle=False, verbose=0, callbacks=[Probe()])
    assert seen == [3, 0, 1, 2]


@pytest.mark.skipif(
    not os.environ.get("ACCUM_KERAS_TORCH_COMPILE"),
    reason="torch.compile takes minutes on CPU; set ACCUM_KERAS_TORCH_COMPILE=1",
)
def test_jit_compile_uses_torch_compile_and_stays_exact():
    x, y = regression_data(samples=60)
    model, plain = functional_twins(small_regression_layers(), K)
    for m in (model, plain):
        m.compile(keras.optimizers.Adam(0.01), loss="mse", jit_compile=True)
    model.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    assert_same_training(model, plain)
