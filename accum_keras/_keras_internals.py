"""Every private Keras (and TensorFlow) internal accum_keras relies on, in one place.

Exact accumulation has to sit inside Keras' training loop: it wraps the
compiled losses, hooks the end of an epoch, threads state through the JAX
step, saves state that is not a weight. Some of that is only reachable through
Keras' private attributes. Each one is reached *only* through an accessor
here, and ``tests/test_keras_internals.py`` names every one and checks that it
still exists with the shape and signature used, so a Keras release that
changes one fails there, loudly, instead of deep inside a user's ``fit()``.

Public Keras API (``keras.tree``, ``keras.StatelessScope``,
``keras.utils.unpack_x_y_sample_weight``, ``keras.losses.Loss``) is used
directly elsewhere and is not listed here.

The methods of Keras' trainers that `AccumulatingModel` *overrides* cannot go
through an accessor; they are listed, with the parameters they must have, in
`OVERRIDDEN_TRAINER_METHODS`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras

# The oldest Keras this package is tested with (setup.cfg declares the same).
MIN_KERAS_VERSION = "3.10.0"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_keras_version(version: str | None = None) -> None:
    """Raises an ImportError naming the installed and the required Keras when it is too old.

    Args:
        version: the version to check; default: the installed ``keras.__version__``.
    """
    version = keras.__version__ if version is None else version
    if _version_tuple(version) < _version_tuple(MIN_KERAS_VERSION):
        raise ImportError(
            f"accum_keras needs keras>={MIN_KERAS_VERSION}; the installed keras is "
            f"{version}. Upgrade it: pip install 'keras>={MIN_KERAS_VERSION}'."
        )


# Before anything reaches into Keras' private modules: an older Keras gets
# this error, not an AttributeError from somewhere below.
check_keras_version()

from keras.src.backend.common import masking as _masking  # noqa: E402
from keras.src.losses import loss as _keras_loss  # noqa: E402
from keras.src.saving import saving_lib as _saving_lib  # noqa: E402
from keras.src.saving.keras_saveable import KerasSaveable  # noqa: E402

# -- saving: training state that is not a weight -------------------------------

#: Base class of objects Keras' saving walks into (`AccumulationState`,
#: the pooled statistics of `AccumBatchNormalization`); they save their
#: variables themselves with ``save_own_variables``/``load_own_variables``.
#: ``keras.src.saving.keras_saveable.KerasSaveable``.
KerasSaveable = KerasSaveable


def _saveable_obj_type() -> str:
    # Keras' saving walks a saveable's attributes minus those of a reference
    # object of its ``_obj_type()``; nothing below our state objects needs
    # walking, so any accepted type will do. "Operation" (the smallest) is
    # accepted from Keras 3.11 on; "Layer" by every Keras 3.
    try:
        _saving_lib.get_attr_skipset("Operation")
    except ValueError:
        return "Layer"
    return "Operation"


#: What ``KerasSaveable._obj_type()`` of our state objects returns.
SAVEABLE_OBJ_TYPE = _saveable_obj_type()


# -- compiled losses ------------------------------------------------------------


def compile_loss(model) -> Any:
    """``model._compile_loss``: the `CompileLoss` built by ``compile()``, or None."""
    return model._compile_loss


def compiled_loss_entries(compiled_loss) -> list:
    """``CompileLoss._flat_losses``: one entry per loss term, once built.

    A mutable list of namedtuples with (at least) the fields ``loss`` (a
    `keras.losses.Loss`) and ``loss_weights``; replacing an entry (with
    ``entry._replace(loss=...)``) changes what the compiled loss computes.
    """
    return compiled_loss._flat_losses


#: ``keras.src.losses.loss.reduce_weighted_values(values, sample_weight, mask,
#: reduction, dtype)``: how `keras.losses.Loss.__call__` reduces its values.
reduce_weighted_values = _keras_loss.reduce_weighted_values

#: ``keras.src.losses.loss.apply_mask(sample_weight, mask, dtype, reduction)``:
#: the sample weights a mask turns into inside `reduce_weighted_values`.
apply_mask = _keras_loss.apply_mask

#: ``keras.src.losses.loss.squeeze_or_expand_to_same_rank(x1, x2)``: how
#: `reduce_weighted_values` aligns weights with values.
squeeze_or_expand_to_same_rank = _keras_loss.squeeze_or_expand_to_same_rank

#: ``keras.src.losses.loss.unscale_loss_for_distribution(value)``: undoes the
#: division of a loss by the number of replicas, as Keras' loss tracker does.
unscale_loss_for_distribution = _keras_loss.unscale_loss_for_distribution

#: ``keras.src.backend.common.masking.get_keras_mask(x)``: the Keras mask
#: carried by a tensor, or None.
get_keras_mask = _masking.get_keras_mask


# -- the model and its trainer ---------------------------------------------------


def call_has_training_arg(model) -> bool:
    """``Layer._call_has_training_arg``: whether ``call`` takes ``training``."""
    return model._call_has_training_arg


def compute_loss(model, x, y, y_pred, sample_weight, training: bool = True) -> Any:
    """``Trainer._compute_loss``: ``compute_loss`` with Keras' compatibility handling."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


def loss_tracker(model) -> Any:
    """``Trainer._loss_tracker``: the `keras.metrics.Mean` behind the logged ``loss``."""
    return model._loss_tracker


def sublayers(model) -> list:
    """``Layer._flatten_layers(include_self=False)``: every layer below the model."""
    return model._flatten_layers(include_self=False)


def symbolic_build(model, data_batch) -> None:
    """``Trainer._symbolic_build(data_batch=...)``: builds the model, compiled loss and metrics.

    Used inside the traced step, where plain Keras builds the model by calling
    it: an error the model raises there reaches the user with its own type
    (``OperatorNotAllowedInGraphError``, a user's exception), which Keras'
    symbolic build would wrap in a ``RuntimeError`` ("Unable to automatically
    build the model"); that wrapper is taken off again.
    """
    try:
        model._symbolic_build(data_batch=data_batch)
    except RuntimeError as error:
        cause = error.__context__
        if cause is None or not str(error).startswith("Unable to automatically build"):
            raise
        raise cause from None


def nnx_enabled() -> bool:
    """``keras.src.backend.config.is_nnx_enabled()`` (Keras' JAX trainer then compiles with Flax NNX)."""
    from keras.src.backend import config

    # Keras before 3.11 has no Flax NNX support, nor the function.
    is_nnx_enabled = getattr(config, "is_nnx_enabled", None)
    return bool(is_nnx_enabled is not None and is_nnx_enabled())


def make_function(model, step) -> Any:
    """``Trainer._make_function(step)``: Keras' train function around one step.

    It adds the iterator, the ``steps_per_execution`` loop, distribution and
    (on TensorFlow, when the model compiles with XLA) ``jit_compile``.
    """
    return model._make_function(step)


@contextlib.contextmanager
def jit_compile_off(model) -> Iterator[None]:
    """Sets ``Trainer._jit_compile`` to False for the duration (what ``jit_compile`` reads)."""
    saved = model._jit_compile
    model._jit_compile = False
    try:
        yield
    finally:
        model._jit_compile = saved


def state_sharding_spec(model) -> Any:
    """``JAXTrainer._get_state_sharding_spec()``: the layouts of the step's four state lists.

    None on Keras versions without it (before 3.11), which lay out the
    step's outputs themselves.
    """
    from keras.src.backend.jax.trainer import JAXTrainer

    if not hasattr(JAXTrainer, "_get_state_sharding_spec"):
        return None
    return model._get_state_sharding_spec()


def distribute_strategy_or_none(model) -> Any:
    """``Trainer._distribute_strategy``: the strategy the model was built in, or None."""
    return getattr(model, "_distribute_strategy", None)


def learning_rate_of(optimizer) -> Any:
    """``BaseOptimizer._learning_rate``: the rate as set (a variable or a schedule).

    ``optimizer.learning_rate`` evaluates a schedule; this returns the schedule.
    """
    return optimizer._learning_rate


def replace_learning_rate(optimizer, rate) -> None:
    """Sets ``BaseOptimizer._learning_rate`` without Keras' setter.

    The setter would untrack the optimizer's rate variable (which stays the
    saved rate) when given a callable.
    """
    optimizer._learning_rate = rate


def compile_arguments(model) -> dict | None:
    """``Trainer._compile_config.config``: the objects ``compile()`` was given.

    The losses, metrics and optimizer themselves (not their serialized
    form), so that functions and classes defined in a user's script work
    without registration. None when the model holds none.
    """
    config = getattr(model, "_compile_config", None)
    arguments = getattr(config, "config", None)
    return dict(arguments) if isinstance(arguments, dict) else None


def sequential_layers(model) -> list:
    """``Sequential._layers``: its layers with the `InputLayer` that gives its shape."""
    return list(model._layers)


def functional_class() -> type:
    """``keras.src.models.functional.Functional``: the class of plain functional models."""
    from keras.src.models.functional import Functional

    return Functional


# -- layers -------------------------------------------------------------------------


def batch_norm_moments(layer, inputs, mask) -> tuple[Any, Any]:
    """``BatchNormalization._moments(inputs, mask)``: the batch's mean and variance."""
    return layer._moments(inputs, mask)


def batch_norm_reduction_axes(layer) -> list[int]:
    """``BatchNormalization._reduction_axes``: the axes a built layer reduces over."""
    return layer._reduction_axes


# -- JAX trainer state ------------------------------------------------------------


def jax_state(model) -> dict | None:
    """``JAXTrainer._jax_state``: the state values of a running ``fit()``, or None."""
    return getattr(model, "_jax_state", None)


def jax_state_synced(model) -> bool:
    """``JAXTrainer._jax_state_synced``: whether the variables hold ``_jax_state``."""
    return model._jax_state_synced


def set_losses_override(model, losses: list) -> None:
    """Sets ``Layer._losses_override``: ``model.losses`` returns these while set."""
    model._losses_override.clear()
    model._losses_override = losses


def clear_losses_override(model) -> None:
    """Empties ``Layer._losses_override``."""
    model._losses_override.clear()


def update_metrics_variables(model, metrics, loss, x, y, y_pred, sample_weight) -> tuple:
    """``JAXTrainer._update_metrics_variables``: stateless metric update.

    Returns:
        ``(logs, metrics_variables)``.
    """
    return model._update_metrics_variables(metrics, loss, x, y, y_pred, sample_weight)


def variable_value(variable) -> Any:
    """``Variable._value``: the backend array, read without a `StatelessScope` lookup."""
    return variable._value


def set_variable_value(variable, value) -> None:
    """Sets ``Variable._value`` (None marks a JAX variable's array as handed to the step)."""
    variable._value = value


# -- TensorFlow distribution --------------------------------------------------------


def in_multi_worker_mode(strategy) -> bool:
    """``keras.src.backend.tensorflow.trainer._collective_all_reduce_multi_worker``."""
    from keras.src.backend.tensorflow.trainer import _collective_all_reduce_multi_worker

    return _collective_all_reduce_multi_worker(strategy)


def strategy_supports_no_merge_call() -> bool:
    """TensorFlow's ``tf.__internal__.distribute.strategy_supports_no_merge_call()``."""
    import tensorflow as tf

    return tf.__internal__.distribute.strategy_supports_no_merge_call()


# -- overridden trainer methods ---------------------------------------------------

#: Private trainer methods `AccumulatingModel` overrides, as
#: ``name: (module, class, parameters, required)``: the Keras class that
#: defines it, its parameters (``self`` first) and whether every supported
#: Keras must have it (an optional one is only called by Keras versions that
#: define it).
OVERRIDDEN_TRAINER_METHODS: dict[str, tuple[str, str, tuple[str, ...], bool]] = {
    # Called after an epoch's last training step, before validation.
    "_get_metrics_result_or_logs": (
        "keras.src.trainers.trainer",
        "Trainer",
        ("self", "logs"),
        True,
    ),
    "_maybe_symbolic_build": (
        "keras.src.backend.tensorflow.trainer",
        "TensorFlowTrainer",
        ("self", "iterator", "data_batch"),
        True,
    ),
    "_get_jax_state": (
        "keras.src.backend.jax.trainer",
        "JAXTrainer",
        (
            "self",
            "trainable_variables",
            "non_trainable_variables",
            "optimizer_variables",
            "metrics_variables",
            "purge_model_variables",
        ),
        True,
    ),
    "jax_state_sync": ("keras.src.backend.jax.trainer", "JAXTrainer", ("self",), True),
    "_get_state_sharding_spec": (
        "keras.src.backend.jax.trainer",
        "JAXTrainer",
        ("self",),
        False,
    ),
}
