"""Learning rates scaled for the effective batch: the rule, its warmup, and the
rate an `AccumulationCallback` gives the optimizer while it trains."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
from keras import ops
from keras.optimizers.schedules import LearningRateSchedule

LR_SCALING_RULES = ("linear", "sqrt", None)

# Keras' own words when a float is assigned to a rate that is a schedule.
_NOT_SETTABLE = (
    "This optimizer was created with a `LearningRateSchedule` object as its "
    "`learning_rate` constructor argument, hence its learning rate is not "
    "settable. If you need the learning rate to be settable, you should "
    "instantiate the optimizer with a float `learning_rate` argument."
)


def check_lr_scaling(rule: Any) -> Any:
    """Validates a learning-rate scaling rule name."""
    if rule not in LR_SCALING_RULES:
        raise ValueError(
            "`lr_scaling` must be one of 'linear' (Goyal et al. 2017), 'sqrt' "
            f"(Hoffer et al. 2017) or None. Received: lr_scaling={rule!r}."
        )
    return rule


def scaling_factor(rule: Any, effective_batch_size: float, base_batch_size: float) -> float:
    """The learning-rate multiplier for a batch ``effective / base`` times larger.

    Args:
        rule: ``"linear"``, ``"sqrt"`` or `None`.
        effective_batch_size: samples per update.
        base_batch_size: the batch size the base learning rate was tuned for.

    Returns:
        ``r``, ``sqrt(r)`` or 1 with ``r = effective / base``.
    """
    ratio = effective_batch_size / base_batch_size
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    return 1.0


def warmed_up(multiplier, step, warmup_updates: int):
    """``1 + (multiplier - 1) * min(1, step / warmup_updates)`` (tensors in, tensor out).

    The gradual warmup of Goyal et al. (2017): the multiplier rises linearly
    from 1 over the first ``warmup_updates`` updates and holds after.
    """
    if warmup_updates <= 0:
        return multiplier
    progress = ops.minimum(ops.cast(step, "float32") / float(warmup_updates), 1.0)
    return 1.0 + (multiplier - 1.0) * progress


@keras.saving.register_keras_serializable(package="accum_keras")
class ScaledLearningRate(LearningRateSchedule):
    """``base(step) * (1 + (multiplier - 1) * min(1, step / warmup_updates))``.

    A standalone schedule for a rate scaled by a fixed multiplier, with
    warmup. `AccumulationCallback` does not need it (it scales the optimizer's
    own rate during ``fit``); use it to write the scaling into an optimizer
    yourself. Like any `LearningRateSchedule`, it makes the optimizer's
    learning rate not settable.

    Args:
        base: a float learning rate or a `LearningRateSchedule`, evaluated at
            the optimizer's update count.
        multiplier: the factor reached after warmup.
        warmup_updates: number of updates of the warmup (0: none).

    Example:

    ```python
    lr = ScaledLearningRate(1e-3, multiplier=8.0, warmup_updates=500)
    optimizer = keras.optimizers.SGD(lr)
    ```
    """

    def __init__(
        self,
        base: float | LearningRateSchedule,
        multiplier: float = 1.0,
        warmup_updates: int = 0,
    ):
        if isinstance(base, dict):
            base = keras.optimizers.schedules.deserialize(base)
        self.base = base
        self.warmup_updates = int(warmup_updates)
        self.multiplier = keras.Variable(
            float(multiplier), dtype="float32", trainable=False, name="lr_multiplier"
        )

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if isinstance(self.base, LearningRateSchedule):
            base = ops.cast(self.base(step), "float32")
        else:
            base = ops.cast(self.base, "float32")
        multiplier = ops.cast(self.multiplier, "float32")
        return base * warmed_up(multiplier, step, self.warmup_updates)

    def get_config(self) -> dict:
        base = self.base
        if isinstance(base, LearningRateSchedule):
            base = keras.optimizers.schedules.serialize(base)
        return {
            "base": base,
            "multiplier": float(ops.convert_to_numpy(self.multiplier)),
            "warmup_updates": self.warmup_updates,
        }


@keras.saving.register_keras_serializable(package="accum_keras")
class FitLearningRate:
    """The optimizer's learning rate while an `AccumulationCallback` scales it.

    ``rate(step) = base(step) * warmed_up(factor(k), step, warmup_updates)``
    where ``factor`` is the scaling rule applied to ``k * batch_ratio`` and
    ``k`` is read from the model's ``accumulation_steps`` variable (on JAX
    the compiled optimizer update holds it as a constant: the callback traces
    the step again when it changes ``k``).

    The callback puts it in the optimizer's place of the learning rate for one
    ``fit`` and takes it out at the end. Keras treats it as a callable
    learning rate: reading ``optimizer.learning_rate`` calls it, which returns
    a `keras.Variable` whose value is the rate the next update applies, so
    that the usual idioms work as on plain Keras (``.assign(x)``,
    ``.numpy()``, ``float(...)``, ``keras.ops.convert_to_numpy(...)``).
    Assigning a value, to that variable or to ``optimizer.learning_rate``
    (as `keras.callbacks.ReduceLROnPlateau` does), calls `assign`, which
    rescales ``base`` so that the rate applied now becomes that value.
    Saving stores only ``base``: a saved optimizer loads with its unscaled
    rate.

    Args:
        base: the optimizer's own rate: its learning-rate variable, a
            `LearningRateSchedule` or a callable of no argument.
        iterations: the optimizer's update counter.
        accumulation_steps: function returning ``k`` (a variable or an int).
        rule: ``"linear"``, ``"sqrt"`` or None.
        batch_ratio: micro-batch size / ``base_batch_size``, or None while
            unknown (the factor is then 1).
        warmup_updates: updates over which the factor rises from 1.
    """

    def __init__(
        self,
        base: Any,
        iterations: Any = None,
        accumulation_steps: Callable[[], Any] | None = None,
        rule: str | None = None,
        batch_ratio: float | None = 1.0,
        warmup_updates: int = 0,
    ):
        self.base = base
        self._iterations = iterations
        self._accumulation_steps = accumulation_steps
        self.rule = rule
        self.batch_ratio = batch_ratio
        self.warmup_updates = int(warmup_updates)
        # Created here, eagerly: variables cannot be created inside a traced
        # step (JAX's stateless scope, a second tf.function trace).
        self._applied = AppliedLearningRate(self)

    def multiplier(self):
        """The factor the base rate is multiplied by at the current update."""
        if self.rule is None or self.batch_ratio is None:
            return ops.ones((), "float32")
        k = ops.cast(self._accumulation_steps(), "float32")
        factor = k * float(self.batch_ratio)
        if self.rule == "sqrt":
            factor = ops.sqrt(factor)
        return warmed_up(factor, self._iterations, self.warmup_updates)

    def base_rate(self):
        """The optimizer's own (unscaled) rate at the current update."""
        if isinstance(self.base, keras.Variable):
            return ops.cast(self.base, "float32")
        if isinstance(self.base, LearningRateSchedule):
            return ops.cast(self.base(self._iterations), "float32")
        return ops.cast(self.base(), "float32")

    def applied_rate(self):
        """The rate the next update applies: ``base_rate() * multiplier()``."""
        return self.base_rate() * self.multiplier()

    def __call__(self) -> keras.Variable:
        # What `optimizer.learning_rate` returns: a variable, as on plain
        # Keras, whose every read computes the applied rate (inside a traced
        # step too, from the base rate and update count it sees there).
        return self._applied

    def assign(self, value: float) -> None:
        """Sets the rate applied now to ``value`` by rescaling the base rate."""
        if not isinstance(self.base, keras.Variable):
            raise TypeError(_NOT_SETTABLE)
        multiplier = float(ops.convert_to_numpy(self.multiplier()))
        self.base.assign(float(ops.convert_to_numpy(value)) / multiplier)

    def get_config(self) -> dict:
        if isinstance(self.base, keras.Variable):
            return {"base": float(ops.convert_to_numpy(self.base))}
        return {"base": keras.saving.serialize_keras_object(self.base)}

    @classmethod
    def from_config(cls, config: dict) -> Any:
        # The scaling belongs to the fit that installed it: what is restored
        # is the optimizer's own rate.
        base = config["base"]
        if isinstance(base, dict):
            return keras.saving.deserialize_keras_object(base)
        return float(base)


class AppliedLearningRate(keras.Variable):
    """``optimizer.learning_rate`` while a `FitLearningRate` is installed.

    A scalar `keras.Variable` whose value is not stored but computed at every
    read: the rate the next update applies. Assigning to it sets that rate
    (see `FitLearningRate.assign`). Its own storage is never read.

    Args:
        rate: the `FitLearningRate` it shows.
    """

    def __init__(self, rate: FitLearningRate):
        super().__init__(
            initializer="zeros",
            shape=(),
            dtype="float32",
            trainable=False,
            name="learning_rate",
        )
        self._fit_rate = rate

    @property
    def value(self):
        rate = getattr(self, "_fit_rate", None)
        if rate is None:  # still in the base constructor
            return super().value
        return self._maybe_autocast(rate.applied_rate())

    def assign(self, value):
        self._fit_rate.assign(value)
        return self.value
