"""Telling the user when a window's sparse gradients meet a non-linear optimizer.

On TensorFlow an ``Embedding``'s gradient is a ``tf.IndexedSlices`` with one
row per token *occurrence*. Keras' TensorFlow optimizers that are not linear in
the gradient (Adam's and RMSprop's squares, Adamax's absolute values...)
update those rows one by one, so plain Keras' big batch squares each
occurrence, while accum_keras hands the optimizer the window's summed gradient
(the update JAX, PyTorch and a dense gradient give). The results are both
"right" by their own definition but differ, and a user comparing against plain
Keras on TensorFlow has no reason to think of an embedding (T5's relative
position bias is one), so the first window of every ``fit()`` that holds such
gradients warns once, naming the variables (docs/compatibility.md, "Sparse
embedding gradients and Keras' TensorFlow optimizers").

Which optimizers differ is not listed but measured: a fresh copy of the
optimizer updates a small variable once from a sparse gradient with a
repeated row and once from the same gradient summed, and the two updates are
compared (cached per optimizer class and configuration).

Silence it with the standard ``warnings`` machinery::

    import warnings
    import accum_keras

    warnings.filterwarnings("ignore", category=accum_keras.SparseUpdateWarning)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

DOCS = (
    "docs/compatibility.md, section 'Sparse embedding gradients and Keras' TensorFlow optimizers'"
)


class SparseUpdateWarning(UserWarning):
    """accum_keras on TensorFlow differs from plain Keras' sparse big batch.

    Issued once per ``fit()`` when a window holds sparse (``tf.IndexedSlices``)
    gradients and the optimizer's sparse update differs from its update of the
    summed gradient. Silence it with
    ``warnings.filterwarnings("ignore", category=accum_keras.SparseUpdateWarning)``.
    """


def record_sparse_gradients(model, variables: Sequence[Any], gradients: Sequence[Any]) -> None:
    """Notes, while the step is traced, which variables get sparse gradients.

    Args:
        model: the accumulating model.
        variables: the variables the gradients belong to.
        gradients: their gradients, as the tape returned them.
    """
    import tensorflow as tf

    model._accumulation_sparse_variables = tuple(
        variable.path
        for variable, gradient in zip(variables, gradients)
        if isinstance(gradient, tf.IndexedSlices)
    )


def new_fit(model) -> None:
    """Lets the next step of this ``fit()`` warn again."""
    model._accumulation_sparse_warned = False


def warn_once_per_fit(model) -> None:
    """Warns (once per fit) if recorded sparse gradients meet a non-linear optimizer."""
    if getattr(model, "_accumulation_sparse_warned", False):
        return
    names = getattr(model, "_accumulation_sparse_variables", ())
    if not names or model.optimizer is None:
        return
    model._accumulation_sparse_warned = True
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if not sparse_update_differs(optimizer):
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    name = type(optimizer).__name__
    warnings.warn(
        f"accum_keras: {shown} get sparse (tf.IndexedSlices) gradients, and on "
        f"TensorFlow Keras' {name} updates those per row occurrence, not as their sum. "
        f"accum_keras hands {name} the window's summed gradient (the update on JAX, "
        "PyTorch, or with a dense gradient), so plain Keras' TensorFlow big batch "
        f"differs from it (by more the more often a row repeats in a batch). See {DOCS}. Silence with "
        "warnings.filterwarnings('ignore', category=accum_keras.SparseUpdateWarning).",
        SparseUpdateWarning,
        stacklevel=2,
    )


def sparse_update_differs(optimizer) -> bool:
    """Whether ``optimizer`` updates a sparse gradient differently from its sum.

    Args:
        optimizer: a Keras optimizer (not a `LossScaleOptimizer`: pass its
            ``inner_optimizer``).

    Returns:
        True if one update from a ``tf.IndexedSlices`` with a repeated row
        differs from the update from the same gradient summed into a dense
        tensor (True, too, if that cannot be measured for this optimizer).
    """
    try:
        key = (type(optimizer), json.dumps(optimizer.get_config(), sort_keys=True, default=repr))
    except Exception:  # an optimizer that cannot describe itself: measure it each time
        key = None
    if key in _MEASURED:
        return _MEASURED[key]
    try:
        differs = _update_differs(type(optimizer), optimizer.get_config())
    except Exception:  # cannot be measured: say it may differ
        differs = True
    if key is not None:
        _MEASURED[key] = differs
    return differs


# (optimizer class, its configuration) -> whether its sparse update differs.
_MEASURED: dict[Any, bool] = {}


def _update_differs(optimizer_class, config: dict) -> bool:
    import keras
    import numpy as np
    import tensorflow as tf

    # A copy that updates at once (no accumulation of its own), so that the
    # user's optimizer and its state stay untouched.
    config = dict(config, gradient_accumulation_steps=None)
    with tf.init_scope():
        # Rows 0 and 2 each appear twice: Σg² differs from (Σg)² in every column.
        sparse = tf.IndexedSlices(
            tf.constant([[1.0, 2.0], [3.0, -1.0], [0.5, 1.5], [-2.0, 0.25]]),
            tf.constant([0, 0, 2, 2]),
            tf.constant([3, 2]),
        )
        updates = []
        for gradient in (sparse, tf.convert_to_tensor(sparse)):
            variable = keras.Variable(np.zeros((3, 2), "float32"))
            copy = optimizer_class.from_config(config)
            copy.apply([gradient], [variable])
            updates.append(np.asarray(variable.numpy(), "float64"))
    scale = max(np.abs(updates[0]).max(), np.abs(updates[1]).max())
    return bool(np.abs(updates[0] - updates[1]).max() > 1e-3 * scale)
