"""`ScaledLearningRate`: a learning rate multiplied for the effective batch, with warmup."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops
from keras.optimizers.schedules import LearningRateSchedule

LR_SCALING_RULES = ("linear", "sqrt", None)


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


@keras.saving.register_keras_serializable(package="accum_keras")
class ScaledLearningRate(LearningRateSchedule):
    """``base(step) * (1 + (multiplier - 1) * min(1, step / warmup_updates))``.

    The multiplier is reached linearly over the first ``warmup_updates``
    optimizer updates (gradual warmup, Goyal et al. 2017) and held after.
    It lives in a variable, so it can change between epochs without
    retracing the training step.

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
        if self.warmup_updates > 0:
            progress = ops.minimum(step / float(self.warmup_updates), 1.0)
            multiplier = 1.0 + (multiplier - 1.0) * progress
        return base * multiplier

    def get_config(self) -> dict:
        base = self.base
        if isinstance(base, LearningRateSchedule):
            base = keras.optimizers.schedules.serialize(base)
        return {
            "base": base,
            "multiplier": float(ops.convert_to_numpy(self.multiplier)),
            "warmup_updates": self.warmup_updates,
        }
