"""Variables Keras overwrites with their "gradient" instead of optimizing them.

``model.quantize("float8")`` gives each quantized layer scales and amax
histories flagged ``overwrite_with_gradient``: the layer's custom gradient
returns their *new value*, and Keras' optimizer assigns it
(`BaseOptimizer._overwrite_variables_directly_with_gradients`) instead of
taking a step. Summing such values over a window like gradients would make
them ``k`` times too large. Their accumulator is instead the *window
maximum*: the element-wise maximum of the micro-batches' values, which is the
big batch's value for float8 (an amax over a batch is the maximum of the
amaxes of its parts, the rest of the history is shifted identically on every
micro-batch, and the scale is computed from the window's starting history,
the same on every micro-batch). It is kept in the variable's own dtype
whatever ``accumulator_dtype`` says, never weighted by a micro-batch's
divisor, never unscaled by a loss scale, and handed to the optimizer as it
is, so that Keras assigns it exactly as plain Keras does after a step.

Written in `keras.ops`, so every backend's step shares it.
"""

from __future__ import annotations

from typing import Any

from keras import ops


def is_overwritten(variable: Any) -> bool:
    """Whether Keras assigns ``variable``'s gradient as its new value (float8 scales, histories)."""
    return bool(getattr(variable, "overwrite_with_gradient", False))


def window_maximum(accumulated: Any, value: Any, is_first: Any) -> Any:
    """The window maximum after one more micro-batch.

    Args:
        accumulated: the accumulator's current value (ignored when
            ``is_first``: whatever the last window left there).
        value: the micro-batch's "gradient" of the variable (its new value).
        is_first: boolean tensor, whether the micro-batch opens its window.

    Returns:
        ``value`` on a window's first micro-batch, else the element-wise
        maximum of ``accumulated`` and ``value``, in the accumulator's dtype.
    """
    value = ops.cast(ops.convert_to_tensor(value), accumulated.dtype)
    return ops.where(is_first, value, ops.maximum(accumulated, value))
