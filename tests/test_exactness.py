"""The core promise: micro-batch b with k steps trains like plain Keras on batch k*b.

Each test trains an accumulating model on micro-batches and a plain Keras
model on the big batch, from the same weights and in the same data order, and
compares weights and `optimizer.iterations`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    assert_same_training,
    functional_twins,
    masked_token_layers,
    max_relative_difference,
    padded_token_data,
    regression_data,
    small_regression_layers,
)

MICRO, K = 4, 4
BIG = MICRO * K


def fit_twins(accumulating, plain, x, y, epochs=2, fit_kwargs=None, **compile_kwargs):
    fit_kwargs = fit_kwargs or {}
    compile_kwargs.setdefault("loss", "mse")
    optimizer = compile_kwargs.pop("optimizer", None)
    for model in (accumulating, plain):
        model.compile(optimizer=optimizer() if optimizer else "sgd", **compile_kwargs)
    accumulating.fit(x, y, batch_size=MICRO, epochs=epochs, shuffle=False, verbose=0, **fit_kwargs)
    plain.fit(x, y, batch_size=BIG, epochs=epochs, shuffle=False, verbose=0, **fit_kwargs)


class PlainSignSGD(keras.optimizers.Optimizer):
    """A user-written optimizer the library knows nothing about."""

    def update_step(self, gradient, variable, learning_rate):
        step = keras.ops.cast(learning_rate, variable.dtype) * keras.ops.sign(gradient)
        self.assign_sub(variable, step)


OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "lion": lambda: keras.optimizers.Lion(0.001),
    "user_written": lambda: PlainSignSGD(learning_rate=0.001),
    "clipnorm": lambda: keras.optimizers.Adam(0.01, clipnorm=0.05),
    "global_clipnorm": lambda: keras.optimizers.SGD(0.05, global_clipnorm=0.05),
    "clipvalue": lambda: keras.optimizers.SGD(0.05, clipvalue=0.01),
    "sgd_weight_decay": lambda: keras.optimizers.SGD(0.05, weight_decay=0.01),
    "ema": lambda: keras.optimizers.Adam(0.01, use_ema=True, ema_overwrite_frequency=3),
    "exponential_decay": lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_and_option_matches_the_big_batch(name):
    # 60 samples: windows of 16, 16, 16 and a short last one of 12 per epoch.
    x, y = regression_data(samples=60)
    accumulating, plain = functional_twins(small_regression_layers(), K)
    fit_twins(accumulating, plain, x, y, optimizer=OPTIMIZERS[name])
    assert int(plain.optimizer.iterations.numpy()) == 8
    assert_same_training(accumulating, plain)


def test_the_reference_detects_per_micro_batch_averaging():
    # Keras' built-in accumulation averages micro-batch losses: with a short
    # last window it diverges from the big batch, and the comparison sees it.
    x, y = regression_data(samples=60)
    keras.utils.set_random_seed(0)
    inputs, outputs = small_regression_layers()()
    builtin = keras.Model(inputs, outputs)
    _, plain = functional_twins(small_regression_layers(), K)
    plain.set_weights(builtin.get_weights())
    builtin.compile(keras.optimizers.SGD(0.05, gradient_accumulation_steps=K), loss="mse")
    plain.compile(keras.optimizers.SGD(0.05), loss="mse")
    builtin.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=BIG, epochs=2, shuffle=False, verbose=0)
    assert max_relative_difference(builtin.get_weights(), plain.get_weights()) > 1e-4


def test_sample_weights_and_class_weights():
    x, y = regression_data(samples=60)
    weights = np.random.default_rng(1).uniform(0.1, 2.0, size=(60,)).astype("float32")
    accumulating, plain = functional_twins(small_regression_layers(), K)
    fit_twins(accumulating, plain, x, y, fit_kwargs={"sample_weight": weights})
    assert_same_training(accumulating, plain)

    labels = (y[:, 0] > 0).astype("int32")
    accumulating, plain = functional_twins(small_regression_layers(outputs=2), K)
    fit_twins(
        accumulating,
        plain,
        x,
        labels,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        fit_kwargs={"class_weight": {0: 0.3, 1: 2.0}},
    )
    assert_same_training(accumulating, plain)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean_with_sample_weight", "sum"])
def test_every_loss_reduction(reduction):
    x, y = regression_data(samples=60)
    weights = np.random.default_rng(2).uniform(0.0, 3.0, size=(60,)).astype("float32")
    accumulating, plain = functional_twins(small_regression_layers(), K)
    fit_twins(
        accumulating,
        plain,
        x,
        y,
        optimizer=lambda: keras.optimizers.SGD(0.002),
        loss=keras.losses.MeanSquaredError(reduction=reduction),
        fit_kwargs={"sample_weight": weights},
    )
    assert_same_training(accumulating, plain)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean_with_sample_weight"])
def test_masked_per_token_loss_is_normalized_over_the_window(reduction):
    tokens, targets = padded_token_data(samples=60, length=7)
    accumulating, plain = functional_twins(masked_token_layers(), K)
    fit_twins(
        accumulating,
        plain,
        tokens,
        targets,
        # Linear in the gradient, hence exact with the embedding's sparse
        # gradients too (see the sparse tests below).
        optimizer=lambda: keras.optimizers.SGD(0.5, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction),
    )
    assert_same_training(accumulating, plain)


def test_multi_output_with_loss_weights_regularizers_and_add_loss():
    class ActivityPenalty(keras.layers.Layer):
        def call(self, inputs):
            self.add_loss(0.01 * keras.ops.mean(keras.ops.square(inputs)))
            return inputs

    def build():
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(
            8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.01)
        )(inputs)
        hidden = ActivityPenalty()(hidden)
        first = keras.layers.Dense(1, name="first")(hidden)
        second = keras.layers.Dense(3, name="second")(hidden)
        return inputs, [first, second]

    x, y = regression_data(samples=60)
    labels = np.random.default_rng(3).integers(0, 3, size=(60,)).astype("int32")
    accumulating, plain = functional_twins(build, K)
    fit_twins(
        accumulating,
        plain,
        x,
        [y, labels],
        optimizer=lambda: keras.optimizers.Adam(0.01),
        loss=["mse", keras.losses.SparseCategoricalCrossentropy(from_logits=True)],
        loss_weights=[0.7, 1.3],
    )
    assert_same_training(accumulating, plain)


class ArraySequence(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, index):
        window = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[window], self.y[window]


@pytest.mark.parametrize("kind", ["dataset", "pydataset"])
def test_every_input_type(kind):
    x, y = regression_data(samples=60)
    accumulating, plain = functional_twins(small_regression_layers(), K)
    for model in (accumulating, plain):
        model.compile(keras.optimizers.Adam(0.01), loss="mse")
    if kind == "dataset":
        micro = tf.data.Dataset.from_tensor_slices((x, y)).batch(MICRO)
        big = tf.data.Dataset.from_tensor_slices((x, y)).batch(BIG)
    else:
        micro, big = ArraySequence(x, y, MICRO), ArraySequence(x, y, BIG)
    accumulating.fit(micro, epochs=2, shuffle=False, verbose=0)
    plain.fit(big, epochs=2, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)


def test_generators():
    # Keras replays the batches it peeks from a one-shot generator in an
    # order that depends on prefetching, so the generator repeats one
    # micro-batch; what is checked is the windowing through the generator
    # adapter: 6 micro-batches per epoch make a window of 4 and one of 2.
    x, y = regression_data(samples=MICRO)

    def repeat_forever():
        while True:
            yield x, y

    accumulating, plain = functional_twins(small_regression_layers(), K)
    for model in (accumulating, plain):
        model.compile(keras.optimizers.Adam(0.01), loss="mse")
    accumulating.fit(repeat_forever(), steps_per_epoch=6, epochs=2, shuffle=False, verbose=0)
    full, short = np.tile(x, (K, 1)), np.tile(x, (2, 1))
    for _ in range(2):
        plain.fit(full, np.tile(y, (K, 1)), batch_size=BIG, verbose=0)
        plain.fit(short, np.tile(y, (2, 1)), batch_size=BIG, verbose=0)
    assert_same_training(accumulating, plain)


@pytest.mark.parametrize(
    "options",
    [
        {"steps_per_execution": 3},
        {"steps_per_execution": 5, "jit_compile": True},
        {"jit_compile": False},
        {"run_eagerly": True},
    ],
    ids=["steps_per_execution", "spe_and_xla", "no_xla", "eager"],
)
def test_execution_modes(options):
    if keras.backend.backend() == "torch" and options.get("steps_per_execution", 1) > 1:
        pytest.skip("Keras' PyTorch trainer supports only steps_per_execution=1")
    x, y = regression_data(samples=60)
    accumulating, plain = functional_twins(small_regression_layers(), K)
    fit_twins(accumulating, plain, x, y, optimizer=lambda: keras.optimizers.Adam(0.01), **options)
    assert_same_training(accumulating, plain)


# Keras warns of the unused head's missing gradients, for the big batch too.
@pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")
def test_variables_without_gradient_are_left_alone():
    def build():
        inputs = keras.Input((5,))
        used = keras.layers.Dense(1, name="used")(inputs)
        unused = keras.layers.Dense(1, name="unused")(inputs)
        return inputs, [used, unused]

    x, y = regression_data(samples=60)
    accumulating, plain = functional_twins(build, K)
    # AdamW would decay an unused kernel if it received a zero gradient.
    fit_twins(
        accumulating,
        plain,
        x,
        [y, y],
        optimizer=lambda: keras.optimizers.AdamW(0.01, weight_decay=0.5),
        loss=["mse", None],
    )
    assert_same_training(accumulating, plain)


def embedding_layers(one_hot=False):
    def build():
        inputs = keras.Input((7,), dtype="int32")
        if one_hot:
            # The same function of the same (20, 4) table, with a dense gradient.
            embedded = keras.layers.Dense(4, use_bias=False)(keras.ops.one_hot(inputs, 20))
        else:
            embedded = keras.layers.Embedding(20, 4)(inputs)
        pooled = keras.layers.GlobalAveragePooling1D()(embedded)
        return inputs, keras.layers.Dense(1)(pooled)

    return build


def test_sparse_embedding_gradients_with_a_linear_optimizer():
    tokens, targets = padded_token_data(samples=60, length=7)
    targets = targets[:, :1].astype("float32")
    accumulating, plain = functional_twins(embedding_layers(), K)
    fit_twins(
        accumulating,
        plain,
        tokens,
        targets,
        optimizer=lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    )
    assert_same_training(accumulating, plain)


def test_sparse_embedding_gradients_are_summed_before_the_optimizer():
    # The window's sparse gradients are summed into a dense accumulator, so the
    # optimizer sees the gradient of the window: Adam's second moment gets
    # (sum of per-token gradients)^2. Keras' TF Adam given the big batch's
    # IndexedSlices squares each token occurrence instead, so the reference
    # here is the same embedding table written as a dense layer.
    tokens, targets = padded_token_data(samples=60, length=7)
    targets = targets[:, :1].astype("float32")
    keras.utils.set_random_seed(0)
    accumulating, _ = functional_twins(embedding_layers(), K)
    inputs, outputs = embedding_layers(one_hot=True)()
    plain = keras.Model(inputs, outputs)
    plain.set_weights(accumulating.get_weights())
    fit_twins(accumulating, plain, tokens, targets, optimizer=lambda: keras.optimizers.Adam(0.01))
    assert_same_training(accumulating, plain)


def test_staged_training_follows_the_trainable_variables():
    x, y = regression_data(samples=60)
    accumulating, plain = functional_twins(small_regression_layers(), K)
    for trainable_first in (False, True):
        for model in (accumulating, plain):
            model.layers[1].trainable = trainable_first
        fit_twins(
            accumulating, plain, x, y, epochs=1, optimizer=lambda: keras.optimizers.Adam(0.01)
        )
        assert_same_training(accumulating, plain)
    assert len(accumulating._accumulation_state.gradients) == len(accumulating.trainable_variables)


def test_one_accumulation_step_is_plain_keras():
    x, y = regression_data(samples=60)
    accumulating, plain = functional_twins(small_regression_layers(), 1)
    for model in (accumulating, plain):
        model.compile(keras.optimizers.Adam(0.01), loss="mse")
        model.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain, rtol=0.0)
    assert accumulating._accumulation_state.gradients == []


def test_subclassed_model_with_its_own_compute_loss():
    import accum_keras

    class Regressor(accum_keras.AccumulatingModel, keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(8, activation="tanh")
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(self.hidden(x))

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            per_sample = keras.ops.mean(keras.ops.abs(y_pred - y), axis=-1)
            return keras.ops.mean(per_sample)

    class PlainRegressor(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(8, activation="tanh")
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(self.hidden(x))

        compute_loss = Regressor.compute_loss

    x, y = regression_data(samples=60)
    accumulating, plain = Regressor(accumulation_steps=K), PlainRegressor()
    accumulating(x[:1]), plain(x[:1])
    plain.set_weights(accumulating.get_weights())
    for model in (accumulating, plain):
        model.compile(keras.optimizers.Adam(0.01))
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=BIG, epochs=2, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)


def test_loss_layouts_that_cannot_be_exact_are_announced():
    # One accumulator per variable cannot hold a 'sum' term and a normalized
    # term exactly (shared notes §1): the model says so when it traces.
    def build():
        inputs = keras.Input((5,))
        return inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(1)(inputs)]

    x, y = regression_data(samples=16)
    accumulating, _ = functional_twins(build, K)
    accumulating.compile("sgd", loss=["mse", keras.losses.MeanSquaredError(reduction="sum")])
    with pytest.warns(UserWarning, match="mixes loss terms reduced with 'sum'"):
        accumulating.fit(x, [y, y], batch_size=MICRO, verbose=0)
