"""``micro_batch_size``: each train step splits its batch and is plain Keras' step at that batch.

The reference is always a plain Keras model (no accum_keras code) with the
same initial weights, fit on the same batches in the same order: its weights,
optimizer iterations, logged loss and logged metrics must be the in-step
model's, to float32 round-off.
"""

import keras
import numpy as np
import pytest
from helpers import (
    RTOL,
    assert_same_training,
    masked_token_layers,
    max_relative_difference,
    padded_token_data,
    regression_data,
    small_regression_layers,
    split_rows_by_shard,
)

import accum_keras

ON_TENSORFLOW = keras.backend.backend() == "tensorflow"
# PyTorch's trainer has neither XLA nor steps_per_execution > 1.
JIT_CHOICES = [False, True] if ON_TENSORFLOW else [keras.backend.backend() == "jax"]


def twins(build, micro_batch_size, seed=0, model_class=None):
    """An in-step `accum_keras.Model` and a plain `keras.Model` with the same weights."""
    keras.utils.set_random_seed(seed)
    inputs, outputs = build()
    in_step = accum_keras.Model(inputs, outputs, micro_batch_size=micro_batch_size)
    inputs, outputs = build()
    plain = keras.Model(inputs, outputs)
    plain.set_weights(in_step.get_weights())
    return in_step, plain


def fit_both(in_step, plain, data, compile_kwargs, epochs=2, batch_size=None, **fit_kwargs):
    """Fits both models the same way; returns their histories."""
    histories = []
    for model in (in_step, plain):
        model.compile(**compile_kwargs())
        histories.append(
            model.fit(
                *data[:2],
                sample_weight=data[2] if len(data) > 2 else None,
                batch_size=batch_size,
                epochs=epochs,
                shuffle=False,
                verbose=0,
                **fit_kwargs,
            ).history
        )
    return histories


def assert_same_logs(in_step_history, plain_history):
    assert in_step_history.keys() == plain_history.keys()
    for name, values in plain_history.items():
        np.testing.assert_allclose(in_step_history[name], values, rtol=1e-5, err_msg=name)


def adam_mse(jit_compile=False, **kwargs):
    return lambda: dict(
        optimizer=keras.optimizers.Adam(0.01),
        loss="mse",
        metrics=["mae"],
        jit_compile=jit_compile,
        **kwargs,
    )


@pytest.mark.parametrize(
    "batch_size, micro_batch_size, jit_compile",
    [(12, 4, JIT_CHOICES[0]), (12, 5, JIT_CHOICES[-1]), (12, 32, JIT_CHOICES[0])],
    ids=["divides", "remainder-jit" if ON_TENSORFLOW else "remainder", "larger"],
)
def test_each_step_is_plain_keras_step_at_the_fit_batch(batch_size, micro_batch_size, jit_compile):
    # 30 samples: the epoch's last batch (6) is short.
    in_step, plain = twins(small_regression_layers(), micro_batch_size)
    histories = fit_both(
        in_step, plain, regression_data(30), adam_mse(jit_compile), batch_size=batch_size
    )
    assert_same_training(in_step, plain)
    assert_same_logs(*histories)
    assert in_step.pending_micro_steps == 0


def test_sample_weights_and_mean_with_sample_weight():
    x, y = regression_data(30)
    weights = np.random.default_rng(1).uniform(0.0, 3.0, size=30).astype("float32")
    loss = keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
    in_step, plain = twins(small_regression_layers(), 4)
    histories = fit_both(
        in_step,
        plain,
        (x, y, weights),
        lambda: dict(optimizer=keras.optimizers.SGD(0.1), loss=loss, weighted_metrics=["mae"]),
        batch_size=10,
    )
    assert_same_training(in_step, plain)
    assert_same_logs(*histories)


def test_masked_loss_is_normalized_by_the_batch_valid_tokens():
    tokens, targets = padded_token_data(24, 7)
    in_step, plain = twins(masked_token_layers(), 3)
    histories = fit_both(
        in_step,
        plain,
        (tokens, targets),
        lambda: dict(
            # SGD: Keras' TensorFlow Adam updates a sparse Embedding gradient
            # otherwise than its dense sum (docs/compatibility.md).
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["sparse_categorical_accuracy"],
        ),
        batch_size=8,
    )
    assert_same_training(in_step, plain)
    assert_same_logs(*histories)


class MeanActivityPenalty(keras.layers.Layer):
    """``add_loss`` of a mean over the batch's samples.

    Keras 3.15's ``ActivityRegularization`` divides by the batch size; before
    (3.10, the oldest version CI tests) it added a sum over the batch, which
    neither mode can split into micro-batches (docs/guarantees.md).
    """

    def call(self, inputs):
        self.add_loss(0.01 * keras.ops.mean(keras.ops.sum(keras.ops.abs(inputs), axis=-1)))
        return inputs


def test_regularizer_and_add_loss_count_once_per_step():
    def build():
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(
            8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.05)
        )(inputs)
        hidden = MeanActivityPenalty()(hidden)
        return inputs, keras.layers.Dense(1)(hidden)

    in_step, plain = twins(build, 4)
    histories = fit_both(in_step, plain, regression_data(24), adam_mse(), batch_size=12)
    assert_same_training(in_step, plain)
    assert_same_logs(*histories)


def test_learning_rate_schedule_advances_once_per_step():
    def compile_kwargs():
        schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.5)
        return dict(optimizer=keras.optimizers.SGD(schedule), loss="mse")

    in_step, plain = twins(small_regression_layers(), 4)
    fit_both(in_step, plain, regression_data(24), compile_kwargs, batch_size=8)
    assert_same_training(in_step, plain)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="Keras' torch trainer rejects it")
def test_steps_per_execution():
    in_step, plain = twins(small_regression_layers(), 5)
    histories = fit_both(
        in_step,
        plain,
        regression_data(30),
        adam_mse(JIT_CHOICES[0], steps_per_execution=2),
        batch_size=8,
    )
    assert_same_training(in_step, plain)
    assert_same_logs(*histories)


def test_batch_normalization_pools_the_step_micro_batches():
    # BatchNormalization on the inputs: its inputs do not depend on the
    # weights, so its moving statistics must be plain Keras' at the fit batch.
    def build(layer):
        def layers():
            inputs = keras.Input((5,))
            normalized = layer(momentum=0.5)(inputs)
            return inputs, keras.layers.Dense(1)(normalized)

        return layers

    x, y = regression_data(24)
    x = x * 3.0 + 1.0
    keras.utils.set_random_seed(0)
    in_step = accum_keras.Model(
        *build(accum_keras.layers.AccumBatchNormalization)(), micro_batch_size=5
    )
    plain = keras.Model(*build(keras.layers.BatchNormalization)())
    plain.set_weights(in_step.get_weights())
    for model in (in_step, plain):
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(getattr(in_step.layers[1], name)),
            keras.ops.convert_to_numpy(getattr(plain.layers[1], name)),
            rtol=1e-5,
            err_msg=name,
        )


def test_skip_nonfinite_updates_leaves_out_the_step_with_an_infinite_gradient():
    x, y = regression_data(24)
    x[15] = np.inf  # second batch of 8, its second micro-batch of 3
    keras.utils.set_random_seed(0)
    inputs, outputs = small_regression_layers()()
    in_step = accum_keras.Model(inputs, outputs, micro_batch_size=3, skip_nonfinite_updates=True)
    inputs, outputs = small_regression_layers()()
    plain = keras.Model(inputs, outputs)
    plain.set_weights(in_step.get_weights())
    for model in (in_step, plain):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    in_step.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    # The reference never sees the second batch.
    keep = np.r_[0:8, 16:24]
    plain.fit(x[keep], y[keep], batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_same_training(in_step, plain)
    assert int(keras.ops.convert_to_numpy(in_step._accumulation_state.skipped_updates)) == 1


def test_loss_scale_optimizer_under_mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        in_step, plain = twins(small_regression_layers(), 5)
        fit_both(
            in_step,
            plain,
            regression_data(24),
            lambda: dict(optimizer=keras.optimizers.SGD(0.1), loss="mse"),
            batch_size=12,
        )
    finally:
        keras.config.set_dtype_policy("float32")
    assert isinstance(in_step.optimizer, keras.optimizers.LossScaleOptimizer)
    # float16 forward passes of different batch shapes round differently.
    assert_same_training(in_step, plain, rtol=2e-3)


def test_accumulator_dtype_is_the_dtype_the_step_sums_in():
    keras.utils.set_random_seed(0)
    inputs, outputs = small_regression_layers()()
    in_step = accum_keras.Model(inputs, outputs, micro_batch_size=5, accumulator_dtype="bfloat16")
    inputs, outputs = small_regression_layers()()
    plain = keras.Model(inputs, outputs)
    plain.set_weights(in_step.get_weights())
    fit_both(in_step, plain, regression_data(24), adam_mse(), batch_size=12, epochs=1)
    assert in_step._accumulation_state.gradients[0].dtype == "bfloat16"
    # Two bfloat16 roundings of the sum (8 bits of mantissa) per step, through Adam.
    assert max_relative_difference(in_step.get_weights(), plain.get_weights()) < 2e-2
    assert max_relative_difference(in_step.get_weights(), plain.get_weights()) > RTOL


@pytest.mark.skipif(not ON_TENSORFLOW, reason="TensorFlow's graph")
def test_the_tensorflow_step_loops_in_the_graph_instead_of_unrolling():
    import tensorflow as tf

    model = accum_keras.Model(*small_regression_layers()(), micro_batch_size=2)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(*regression_data(12), batch_size=12, verbose=0)

    def graph_ops(batch_size):
        spec = (tf.TensorSpec([batch_size, 5]), tf.TensorSpec([batch_size, 1]))
        graph = tf.function(model.train_step).get_concrete_function(spec).graph.as_graph_def()
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        return [node.op for node in nodes]

    # 6 and 24 micro-batches: one loop body, the same matrix products.
    six, twenty_four = graph_ops(12), graph_ops(48)
    assert six.count("While") + six.count("StatelessWhile") == 1
    assert six.count("MatMul") == twenty_four.count("MatMul")


# -- validation, composition, configuration --------------------------------------


@pytest.mark.parametrize("value", [0, -3, 2**31])
def test_micro_batch_size_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="`micro_batch_size` must be None .* int >= 1"):
        accum_keras.Model(*small_regression_layers()(), micro_batch_size=value)


@pytest.mark.parametrize("value", [2.0, True, "4"])
def test_micro_batch_size_of_another_type_is_refused(value):
    with pytest.raises(TypeError, match="`micro_batch_size` must be None .* int >= 1"):
        accum_keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)], micro_batch_size=value)


def test_the_two_modes_together_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="cannot be combined with `accumulation_steps > 1`"):
        accum_keras.Model(*small_regression_layers()(), accumulation_steps=2, micro_batch_size=4)
    model = accum_keras.Model(*small_regression_layers()(), micro_batch_size=4)
    with pytest.raises(ValueError, match="cannot be combined"):
        model.accumulation_steps = 2
    model.micro_batch_size = None
    model.accumulation_steps = 2
    with pytest.raises(ValueError, match="cannot be combined"):
        model.micro_batch_size = 4
    with pytest.raises(ValueError, match="cannot be combined"):
        accum_keras.accumulate(keras.Model(*small_regression_layers()()), 2, micro_batch_size=4)


def test_a_user_written_train_step_is_refused_at_fit_start():
    class OwnStep(accum_keras.Model):
        def train_step(self, *args):
            # ``(data)``, or ``(state, data)`` on JAX.
            return super().train_step(*args)

    model = OwnStep(*small_regression_layers()(), micro_batch_size=4)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(NotImplementedError, match="defines its own `train_step`"):
        model.fit(*regression_data(8), batch_size=8, verbose=0)


def test_micro_batch_size_is_kept_by_config_save_and_clone(tmp_path):
    model = accum_keras.Model(*small_regression_layers()(), micro_batch_size=4)
    model.compile(optimizer="adam", loss="mse")
    model.fit(*regression_data(8), batch_size=8, verbose=0)
    assert model.get_config()["micro_batch_size"] == 4
    assert accum_keras.Model.from_config(model.get_config()).micro_batch_size == 4
    assert accum_keras.clone_model(model).micro_batch_size == 4
    path = str(tmp_path / "model.keras")
    model.save(path)
    assert keras.models.load_model(path).micro_batch_size == 4
    twin = accum_keras.accumulate(keras.Model(*small_regression_layers()()), 1, micro_batch_size=3)
    assert twin.micro_batch_size == 3
    assert "micro_batch_size" not in accum_keras.Model(*small_regression_layers()()).get_config()


def test_micro_batch_size_changes_between_fits():
    in_step, plain = twins(small_regression_layers(), 5)
    x, y = regression_data(24)
    fit_both(in_step, plain, (x, y), adam_mse(), batch_size=12, epochs=1)
    in_step.micro_batch_size = 2
    for model in (in_step, plain):
        model.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0)
    in_step.micro_batch_size = None
    for model in (in_step, plain):
        model.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0)
    assert_same_training(in_step, plain)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_train_on_batch_is_plain_keras_step_on_its_batch(run_eagerly):
    # train_on_batch hands the step (x, y, None): the missing sample weight
    # must stay missing in every micro-batch.
    in_step, plain = twins(small_regression_layers(), 4)
    x, y = regression_data(10)
    for model in (in_step, plain):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=run_eagerly)
        for start in (0, 7):
            model.train_on_batch(x[start : start + 7], y[start : start + 7])
    assert_same_training(in_step, plain)


# -- the split rule (docs/how-it-works.md, "The in-step mode") -------------------


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("micro_batch_size", [8, 32])
def test_each_shard_splits_its_own_rows_by_the_same_stride_rule(shards, micro_batch_size):
    from accum_keras import _split

    # 28 rows, m = 8: three full micro-batches (2 rows of each of 4 shards)
    # and a remainder of 4 (1 row of each); m = 32: the remainder only.
    x = np.arange(28 * 3, dtype="float32").reshape(28, 3)
    y = np.arange(28, dtype="float32") * 10
    data = (keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y), None)
    full, remainder = _split.counts(28, micro_batch_size)
    expected = split_rows_by_shard(np.arange(28), micro_batch_size, shards)
    got = [
        _split.full_micro_batch(data, index, full, micro_batch_size, shards)
        for index in range(full)
    ]
    if full:
        stacked = _split.stacked_full_micro_batches(data, full, micro_batch_size, shards)
        for index in range(full):
            for leaf in range(2):
                np.testing.assert_array_equal(
                    keras.ops.convert_to_numpy(stacked[leaf][index]),
                    keras.ops.convert_to_numpy(got[index][leaf]),
                )
    if remainder:
        got.append(_split.remainder_micro_batch(data, full, micro_batch_size, shards))
    assert len(got) == len(expected)
    for (mx, my, sample_weight), rows in zip(got, expected, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mx), x[rows])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(my), y[rows])
        assert sample_weight is None


def test_the_split_follows_the_shards_only_when_they_divide_batch_and_micro_batch():
    from accum_keras import _split

    assert _split.aligned_shards(28, 8, 4) == 4
    assert _split.aligned_shards(28, 8, 8) == 1  # 8 does not divide 28
    assert _split.aligned_shards(28, 6, 4) == 1  # nor 4 divide 6
    assert _split.aligned_shards(28, 8, 1) == 1
    with pytest.raises(ValueError, match="`shards` must be a positive int that divides"):
        _split.remainder_micro_batch((np.zeros((28, 3)),), 3, 8, 3)


def test_accumulate_takes_micro_batch_size_alone():
    # accumulate(model, micro_batch_size=m), as the in-step mode is written:
    # a new twin's accumulation_steps is then 1, an accumulating model's kept.
    inputs = keras.Input((3,))
    plain = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    twin = accum_keras.accumulate(plain, micro_batch_size=2)
    assert (twin.accumulation_steps, twin.micro_batch_size) == (1, 2)
    streaming = accum_keras.Model(inputs, plain.outputs, accumulation_steps=4)
    assert accum_keras.accumulate(streaming).accumulation_steps == 4
