"""`AccumBatchNormalization`: moving statistics updated once per window, with pooled statistics.

Inside a window each micro-batch is still normalized with its own statistics
(like any BatchNormalization at that batch size: "ghost batch norm"), but the
moving mean and variance are not updated per micro-batch. The layer pools the
count, mean and sum of squared deviations of every micro-batch of the window
(Chan et al.'s parallel update, numerically stable) and updates the moving
statistics once, when the window is applied, with the mean and (biased)
variance of all the window's samples: what batch ``k * b`` would have stored.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from accum_keras import _keras_internals
from accum_keras._keras_internals import KerasSaveable
from accum_keras._state import _same_layout


def _replicated_layout() -> dict:
    """The layout argument that keeps a scalar whole on every device.

    Under a `keras.distribution.ModelParallel` a variable created without a
    layout takes the `LayoutMap` entry its path matches; a key written for
    the layer (``".*bn.*"``) would give the scalar window count a rank-1
    layout it cannot have. Empty without a distribution (and off JAX, whose
    variables alone take a ``layout`` argument).
    """
    distribution = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    if distribution is None:
        return {}
    return {"layout": keras.distribution.TensorLayout([], distribution.device_mesh)}


class WindowStatistics(KerasSaveable):
    """Pooled statistics of the open window of one layer (training state).

    Attributes:
        count: number of values pooled per channel.
        mean: their mean, per channel.
        m2: their sum of squared deviations from ``mean``, per channel.
    """

    def __init__(self, layer: keras.layers.BatchNormalization):
        channels = layer.moving_mean.shape[0]

        def zeros(shape, name, **layout):
            return keras.Variable(
                initializer="zeros",
                shape=shape,
                # float32 whatever the policy, as the layer's own arithmetic:
                # a half-precision sum of the window would lose what pooling
                # keeps.
                dtype="float32",
                trainable=False,
                name=name,
                aggregation="only_first_replica",
                # Read in `call()`, where a mixed policy would otherwise hand
                # back the compute dtype.
                autocast=False,
                **layout,
            )

        self.count = zeros((), "window_count", **_replicated_layout())
        self.mean = zeros((channels,), "window_mean", **_same_layout(layer.moving_mean))
        self.m2 = zeros((channels,), "window_m2", **_same_layout(layer.moving_variance))

    def _obj_type(self):
        # See `AccumulationState._obj_type`.
        return _keras_internals.SAVEABLE_OBJ_TYPE

    def add(self, count: Any, mean: Any, variance: Any) -> None:
        """Pools one micro-batch's ``count`` values of ``mean`` and biased ``variance``."""
        total = self.count.value + count
        delta = mean - self.mean.value
        self.mean.assign(self.mean.value + delta * ops.divide_no_nan(count, total))
        self.m2.assign(
            self.m2.value
            + variance * count
            + ops.square(delta) * ops.divide_no_nan(self.count.value * count, total)
        )
        self.count.assign(total)

    def variance(self) -> Any:
        return ops.divide_no_nan(self.m2.value, self.count.value)

    def reset(self) -> None:
        for variable in (self.count, self.mean, self.m2):
            variable.assign(ops.zeros_like(variable.value))

    def save_own_variables(self, store) -> None:
        for name in ("count", "mean", "m2"):
            store[name] = getattr(self, name).numpy()

    def load_own_variables(self, store) -> None:
        for name in ("count", "mean", "m2"):
            getattr(self, name).assign(store[name])


@keras.saving.register_keras_serializable(package="accum_keras")
class AccumBatchNormalization(keras.layers.BatchNormalization):
    """A `keras.layers.BatchNormalization` that respects accumulation windows.

    Takes the same arguments and has the same weights as BatchNormalization
    (weights can be copied both ways). Inside an `AccumulatingModel` with
    ``accumulation_steps > 1`` or ``micro_batch_size`` the moving mean and
    variance are updated once per window (in-step: once per train step) with
    the pooled statistics of all its micro-batches' samples, which is what
    BatchNormalization on the big batch stores. Elsewhere (plain models,
    ``accumulation_steps == 1`` without ``micro_batch_size``, inference) it
    is BatchNormalization.
    Batch renormalization (``renorm=True``) is not supported.

    Example:

    ```python
    model = accum_keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3),
        accum_keras.layers.AccumBatchNormalization(),
        keras.layers.ReLU(),
    ], accumulation_steps=8)
    ```
    """

    def __init__(self, **kwargs):
        if kwargs.get("renorm"):
            raise ValueError(
                "AccumBatchNormalization does not support `renorm=True` "
                "(its corrections depend on each batch's statistics)."
            )
        super().__init__(**kwargs)
        self.defer_to_window = False
        self._window: WindowStatistics | None = None

    @property
    def window_variables(self) -> list:
        """The pooled statistics of the open window (training state, not weights)."""
        window = self._window
        return [] if window is None else [window.count, window.mean, window.m2]

    def build(self, input_shape):
        super().build(input_shape)
        self._window = WindowStatistics(self)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and self.defer_to_window):
            return super().call(inputs, training=training, mask=mask)
        inputs = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = _keras_internals.batch_norm_moments(self, inputs, mask)
        self._window.add(self._count(inputs, mask), mean, variance)
        gamma = ops.cast(self.gamma, inputs.dtype) if self.scale else None
        beta = ops.cast(self.beta, inputs.dtype) if self.center else None
        outputs = ops.batch_normalization(
            x=inputs,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    def _count(self, inputs, mask):
        if mask is not None:
            # Each valid position contributes one value to every channel.
            return ops.sum(ops.cast(mask, "float32"))
        shape = ops.shape(inputs)
        count = 1.0
        for axis in _keras_internals.batch_norm_reduction_axes(self):
            count = count * ops.cast(shape[axis], "float32")
        return count

    def apply_window_statistics(self, applied: Any = None) -> None:
        """Updates the moving statistics with the window's pooled statistics.

        The pooled statistics are reset either way: a window that is not
        applied leaves no trace in the next one.

        Args:
            applied: boolean tensor, whether the window is applied (False for
                a window skipped for a non-finite gradient); None for True.
                A selection rather than a branch, so that it runs unchanged
                in every backend's step.
        """
        window = self._window
        momentum = self.momentum
        # An empty window (a frozen layer, one that saw no micro-batch)
        # leaves the moving statistics as they are.
        update = window.count.value > 0
        if applied is not None:
            update = ops.logical_and(update, applied)
        # In float32 and rounded once to the moving statistics' dtype (bfloat16
        # under a ``bfloat16`` policy), as BatchNormalization does.
        moving_mean = ops.cast(self.moving_mean.value, "float32")
        moving_variance = ops.cast(self.moving_variance.value, "float32")
        new_mean = moving_mean * momentum + window.mean.value * (1.0 - momentum)
        new_variance = moving_variance * momentum + window.variance() * (1.0 - momentum)
        self.moving_mean.assign(
            ops.cast(ops.where(update, new_mean, moving_mean), self.moving_mean.dtype)
        )
        self.moving_variance.assign(
            ops.cast(ops.where(update, new_variance, moving_variance), self.moving_variance.dtype)
        )
        window.reset()

    def discard_window_statistics(self) -> None:
        """Forgets the open window's statistics (the window was discarded)."""
        if self._window is not None:
            self._window.reset()


def convert_batch_normalization(model: keras.Model) -> keras.Model:
    """Returns a copy of a functional or sequential model with accumulation-aware BatchNorm.

    Every `keras.layers.BatchNormalization` becomes an `AccumBatchNormalization`
    with the same configuration and weights; other layers are cloned with
    their weights. An accumulating model stays accumulating, of the same
    class with the same ``accumulation_steps`` and ``skip_nonfinite_updates``
    (see `accum_keras.clone_model`).

    Args:
        model: a functional or `Sequential` model (subclassed models have no
            graph to rebuild: replace their layers in code instead).

    Returns:
        The converted model, uncompiled.

    Example:

    ```python
    model = accum_keras.layers.convert_batch_normalization(model)
    model.compile(...)
    ```
    """

    def clone(layer):
        config = layer.get_config()
        if type(layer) is keras.layers.BatchNormalization:
            return AccumBatchNormalization.from_config(config)
        return layer.__class__.from_config(config)

    from accum_keras._accumulate import clone_model

    converted = clone_model(model, clone_function=clone)
    # By path, not by position: a float8-quantized layer rebuilt from its
    # config lists its scales before its kernel, unlike the layer quantized
    # by `quantize("float8")`.
    values = {variable.path: variable for variable in model.weights}
    if {variable.path for variable in converted.weights} == values.keys():
        for variable in converted.weights:
            variable.assign(values[variable.path])
    else:
        converted.set_weights(model.get_weights())
    return converted
