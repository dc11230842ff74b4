"""`AccumulationCallback`: learning rate for the effective batch, a schedule for k, logs."""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
from keras import ops

from accum_keras import _keras_internals
from accum_keras._config import check_accumulation_steps
from accum_keras._schedules import ScaledLearningRate, check_lr_scaling, scaling_factor

AccumulationSchedule = dict[int, int] | Callable[[int], int]


class AccumulationCallback(keras.callbacks.Callback):
    """Companion callback of `AccumulatingModel`.

    - Scales the learning rate for the effective batch (micro-batch x
      ``accumulation_steps``) relative to ``base_batch_size``: ``"linear"``
      multiplies it by the batch ratio (Goyal et al. 2017), ``"sqrt"`` by its
      square root (Hoffer et al. 2017), None leaves it alone. The optimizer's
      rate (float or `LearningRateSchedule`) becomes the base of a
      `ScaledLearningRate`, installed once per optimizer, so calling ``fit``
      again does not scale twice.
    - Optionally warms the multiplier up linearly over the first
      ``warmup_updates`` updates or ``warmup_epochs`` epochs.
    - Optionally changes ``accumulation_steps`` at epoch starts
      (``accumulation_schedule``), to grow the batch instead of decaying the
      rate (Smith et al. 2017).
    - Adds ``effective_batch_size`` (samples per update, counted),
      ``accumulation_steps``, ``learning_rate``, ``updates`` and
      ``skipped_updates`` (windows dropped for a non-finite gradient under
      mixed precision) to the logs that
      the progress bar, `History`, `CSVLogger` and `TensorBoard` see. The model
      runs this callback before the others. At batch level
      ``effective_batch_size`` is that of the last update; at epoch level it is
      the epoch's samples divided by its updates.

    Args:
        lr_scaling: ``"linear"``, ``"sqrt"`` or None.
        base_batch_size: the batch size the optimizer's learning rate was
            tuned for. Default: the micro-batch size, i.e. the multiplier is
            ``accumulation_steps`` (linear) or its square root.
        warmup_updates: updates over which the multiplier rises from 1.
        warmup_epochs: the same, in epochs (needs a known number of steps per
            epoch). At most one of the two warmups may be set.
        accumulation_schedule: ``{epoch: k}`` (k holds from that epoch on) or a
            function ``epoch -> k``.
        verbose: 1 prints a line when the schedule changes ``k``.

    Example:

    ```python
    model.fit(
        x, y, batch_size=4, epochs=10,
        callbacks=[accum_keras.AccumulationCallback(
            lr_scaling="linear", warmup_epochs=2)],
    )
    ```
    """

    def __init__(
        self,
        lr_scaling: str | None = "linear",
        base_batch_size: int | None = None,
        warmup_updates: int = 0,
        warmup_epochs: float = 0,
        accumulation_schedule: AccumulationSchedule | None = None,
        verbose: int = 0,
    ):
        super().__init__()
        self.lr_scaling = check_lr_scaling(lr_scaling)
        if base_batch_size is not None:
            check_accumulation_steps(base_batch_size, name="base_batch_size")
        self.base_batch_size = base_batch_size
        _check_non_negative("warmup_updates", warmup_updates)
        _check_non_negative("warmup_epochs", warmup_epochs)
        if warmup_updates and warmup_epochs:
            raise ValueError(
                "Set at most one of `warmup_updates` and `warmup_epochs`. "
                f"Received: warmup_updates={warmup_updates}, "
                f"warmup_epochs={warmup_epochs}."
            )
        self.warmup_updates = int(warmup_updates)
        self.warmup_epochs = warmup_epochs
        self.accumulation_schedule = _check_schedule(accumulation_schedule)
        self.verbose = verbose
        self._micro_batch_size: int | None = None
        self._epoch_start = (0.0, 0)

    # -- setup -------------------------------------------------------------

    def set_model(self, model):
        from accum_keras._model import AccumulatingModel

        if not isinstance(model, AccumulatingModel):
            raise TypeError(
                "AccumulationCallback needs a model that inherits "
                "accum_keras.AccumulatingModel (or accum_keras.Model / "
                f"accum_keras.Sequential). Received a {type(model).__name__}."
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        if self.lr_scaling is None and not self.warmup_updates and not self.warmup_epochs:
            return
        optimizer = self.model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        schedule = _keras_internals.learning_rate_of(inner)
        if not isinstance(schedule, ScaledLearningRate):
            base = schedule
            if isinstance(base, keras.Variable):
                base = float(ops.convert_to_numpy(base))
            schedule = ScaledLearningRate(base, 1.0, self._warmup_updates())
            inner.learning_rate = schedule
            # The traced step read the old rate; trace it again.
            self.model.make_train_function(force=True)
        else:
            schedule.warmup_updates = self._warmup_updates()
        self._schedule = schedule
        self._update_multiplier()

    def _warmup_updates(self) -> int:
        if not self.warmup_epochs:
            return self.warmup_updates
        steps = (self.params or {}).get("steps")
        if not steps:
            raise ValueError(
                "`warmup_epochs` needs the number of steps per epoch, which "
                "this fit() does not know (a dataset or generator of unknown "
                "length). Pass `steps_per_epoch` to fit() or use "
                "`warmup_updates`."
            )
        k = self.model.accumulation_steps
        return max(1, round(self.warmup_epochs * math.ceil(steps / k)))

    def _update_multiplier(self) -> None:
        schedule = getattr(self, "_schedule", None)
        if schedule is None:
            return
        k = self.model.accumulation_steps
        if self.base_batch_size is None:
            factor = scaling_factor(self.lr_scaling, k, 1)
        elif self._micro_batch_size is None:
            return  # set once the first micro-batch has been measured
        else:
            factor = scaling_factor(
                self.lr_scaling, self._micro_batch_size * k, self.base_batch_size
            )
        schedule.multiplier.assign(factor)

    # -- per epoch / batch ---------------------------------------------------

    def on_epoch_begin(self, epoch, logs=None):
        if self.accumulation_schedule is not None:
            k = self._scheduled_steps(epoch)
            if k != self.model.accumulation_steps:
                if self.verbose:
                    print(f"\nEpoch {epoch + 1}: accumulation_steps -> {k}")
                self.model.accumulation_steps = k
                self._update_multiplier()
        self._epoch_start = (self._samples_seen(), self._updates())

    def on_train_batch_end(self, batch, logs=None):
        if self._micro_batch_size is None and self.base_batch_size is not None:
            seen = self._samples_seen() - self._epoch_start[0]
            self._micro_batch_size = max(1, round(seen / (batch + 1)))
            self._update_multiplier()
        if logs is not None:
            state = self.model._accumulation_state
            logs["effective_batch_size"] = int(ops.convert_to_numpy(state.last_update_samples))
            self._add_common_logs(logs)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        samples = self._samples_seen() - self._epoch_start[0]
        updates = self._updates() - self._epoch_start[1]
        logs["effective_batch_size"] = samples / updates if updates else 0.0
        self._add_common_logs(logs)

    def _add_common_logs(self, logs) -> None:
        optimizer = self.model.optimizer
        logs["accumulation_steps"] = self.model.accumulation_steps
        logs["learning_rate"] = float(ops.convert_to_numpy(optimizer.learning_rate))
        logs["updates"] = self._updates()
        logs["skipped_updates"] = int(
            ops.convert_to_numpy(self.model._accumulation_state.skipped_updates)
        )

    def _scheduled_steps(self, epoch: int) -> int:
        schedule = self.accumulation_schedule
        if callable(schedule):
            return check_accumulation_steps(schedule(epoch), name="accumulation_schedule(epoch)")
        started = [e for e in schedule if e <= epoch]
        if not started:
            return self.model.accumulation_steps
        return schedule[max(started)]

    def _samples_seen(self) -> float:
        return float(ops.convert_to_numpy(self.model._accumulation_state.samples_seen))

    def _updates(self) -> int:
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))


def _check_non_negative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"`{name}` must be a number >= 0. Received: {name}={value!r}.")


def _check_schedule(schedule):
    if schedule is None or callable(schedule):
        return schedule
    if not isinstance(schedule, dict) or not schedule:
        raise TypeError(
            "`accumulation_schedule` must be a non-empty dict {epoch: "
            "accumulation_steps} or a function epoch -> accumulation_steps. "
            f"Received: {schedule!r}."
        )
    checked = {}
    for epoch, steps in schedule.items():
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(
                "`accumulation_schedule` keys must be epoch indices (ints >= 0). "
                f"Received key {epoch!r}."
            )
        checked[epoch] = check_accumulation_steps(steps, name=f"accumulation_schedule[{epoch}]")
    return checked
