"""`AccumulationCallback`: learning rate for the effective batch, a schedule for k, logs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import keras
from keras import ops

from accum_keras import _keras_internals
from accum_keras._config import check_accumulation_steps
from accum_keras._schedules import FitLearningRate, check_lr_scaling

AccumulationSchedule = dict[int, int] | Callable[[int], int]


class AccumulationCallback(keras.callbacks.Callback):
    """Companion callback of `AccumulatingModel`.

    - Scales the learning rate for the effective batch (micro-batch x
      ``accumulation_steps``) relative to ``base_batch_size`` during the
      ``fit`` it is passed to: ``"linear"`` multiplies it by the batch ratio
      (Goyal et al. 2017), ``"sqrt"`` by its square root (Hoffer et al.
      2017), None leaves it alone. Outside that ``fit`` the optimizer has its
      own, unscaled rate again.
    - Optionally warms the multiplier up linearly from 1 over the first
      ``warmup_updates`` updates or ``warmup_epochs`` epochs.
    - Optionally changes ``accumulation_steps`` at epoch starts
      (``accumulation_schedule``), to grow the batch instead of decaying the
      rate (Smith et al. 2017).
    - Logs ``effective_batch_size`` (samples per update, counted) and
      ``learning_rate`` (see "Logs" below).

    Learning rate during the fit. ``optimizer.learning_rate`` reads the rate
    the next update applies (scaled and warmed up). Assigning a float to it,
    as `keras.callbacks.ReduceLROnPlateau` and
    `keras.callbacks.LearningRateScheduler` do, sets the rate applied now to
    that float by rescaling the optimizer's own rate; scaling and warmup keep
    acting relative to it. So a reduction by a factor is applied exactly
    once, and ``LearningRateScheduler(lambda epoch, lr: ...)`` receives and
    returns applied rates. A rate that is a `LearningRateSchedule` stays not
    settable, as in Keras. What the callbacks change is kept, unscaled, after
    the fit (a rate reduced by half during the fit is half the original one).

    Logs. Batch logs (the progress bar) get ``effective_batch_size``: the
    samples of the last update, from the first update of the fit on. Epoch
    logs (the bar's last line, `History`, `CSVLogger`, `TensorBoard`) get
    ``effective_batch_size`` (the mean batch of the epoch's updates: the
    samples of the updates applied in the epoch, over their number, when
    the epoch made one; a skipped window is no update, and a window
    continued from an interrupted ``fit()`` counts all its samples),
    ``learning_rate``, ``accumulation_steps`` when an
    ``accumulation_schedule`` is set, and ``skipped_updates`` (windows
    dropped for a non-finite gradient, since the model was created) when
    windows can be skipped (``skip_nonfinite_updates=True`` or a
    `LossScaleOptimizer`). The model runs this
    callback before the others, so they all see these logs.

    Args:
        lr_scaling: ``"linear"``, ``"sqrt"`` or None.
        base_batch_size: the batch size in samples the optimizer's learning
            rate was tuned for. Default: the micro-batch size, i.e. the
            multiplier is ``accumulation_steps`` (linear) or its square root.
            Otherwise the multiplier takes effect once the first micro-batch
            has been measured.
        warmup_updates: updates over which the multiplier rises from 1.
        warmup_epochs: the same, in epochs (needs a known number of steps per
            epoch; each epoch counts ``ceil(steps / accumulation_steps)``
            updates). At most one of the two warmups may be set.
        accumulation_schedule: ``{epoch: k}`` (k holds from that epoch on) or a
            function ``epoch -> k``.
        verbose: 1 prints a line when the schedule changes ``k``.

    Example:

    ```python
    model.fit(
        x, y, batch_size=4, epochs=10,
        callbacks=[
            accum_keras.AccumulationCallback(lr_scaling="linear", warmup_epochs=2),
            keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5),
        ],
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
            _check_batch_size(base_batch_size)
            base_batch_size = int(base_batch_size)
        self.base_batch_size = base_batch_size
        self.warmup_updates = _check_warmup_updates(warmup_updates)
        self.warmup_epochs = _check_warmup_epochs(warmup_epochs)
        if self.warmup_updates and self.warmup_epochs:
            raise ValueError(
                "Set at most one of `warmup_updates` and `warmup_epochs`. "
                f"Received: warmup_updates={warmup_updates}, "
                f"warmup_epochs={warmup_epochs}."
            )
        if self.lr_scaling is None and (self.warmup_updates or self.warmup_epochs):
            raise ValueError(
                "The warmup raises the scaling multiplier from 1 to its value; "
                "with lr_scaling=None there is nothing to warm up. Choose "
                "lr_scaling='linear' or 'sqrt', or warm an unscaled rate up with "
                "a schedule, e.g. keras.optimizers.schedules.CosineDecay("
                "..., warmup_steps=...). Received: lr_scaling=None, "
                f"warmup_updates={warmup_updates}, warmup_epochs={warmup_epochs}."
            )
        self.accumulation_schedule = _check_schedule(accumulation_schedule)
        self.verbose = verbose
        self._micro_batch_size: int | None = None
        self._rate: FitLearningRate | None = None
        self._epoch_start = _Counters(0, 0, 0, 0)
        self._fit_start_updates = 0
        self._log_skips = False

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
        model = self.model
        self._fit_start_updates = self._updates()
        self._log_skips = model.skip_nonfinite_updates or isinstance(
            model.optimizer, keras.optimizers.LossScaleOptimizer
        )
        self._install_rate()

    def on_train_end(self, logs=None):
        self._remove_rate()

    def _install_rate(self) -> None:
        inner = _inner_optimizer(self.model.optimizer)
        own_rate = _keras_internals.learning_rate_of(inner)
        changed = isinstance(own_rate, FitLearningRate)
        if changed:
            # Left by a fit that raised before `on_train_end`.
            own_rate = own_rate.base
            _keras_internals.replace_learning_rate(inner, own_rate)
        self._rate = None
        if self.lr_scaling is not None:
            changed = True
            model = self.model
            state = model._accumulation_state

            def accumulation_steps():
                return state.accumulation_steps if state.built else model.accumulation_steps

            self._rate = FitLearningRate(
                own_rate,
                iterations=inner.iterations,
                accumulation_steps=accumulation_steps,
                rule=self.lr_scaling,
                batch_ratio=self._batch_ratio(),
                warmup_updates=self._warmup_updates(),
            )
            # Set directly, not through Keras' setter: that one would untrack
            # the optimizer's rate variable, which stays the saved rate.
            _keras_internals.replace_learning_rate(inner, self._rate)
        if changed:
            # The compiled step read the previous rate; trace it again.
            self.model.make_train_function(force=True)

    def _remove_rate(self) -> None:
        rate, self._rate = self._rate, None
        if rate is None:
            return
        inner = _inner_optimizer(self.model.optimizer)
        # Unless something assigned a new schedule during the fit.
        if _keras_internals.learning_rate_of(inner) is rate:
            _keras_internals.replace_learning_rate(inner, rate.base)
            self.model.make_train_function(force=True)

    def _batch_ratio(self) -> float | None:
        if self.base_batch_size is None:
            return 1.0
        if self._micro_batch_size is None:
            return None  # known once the first micro-batch has been measured
        return self._micro_batch_size / self.base_batch_size

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

    # -- per epoch / batch ---------------------------------------------------

    def on_epoch_begin(self, epoch, logs=None):
        if self.accumulation_schedule is not None:
            k = self._scheduled_steps(epoch)
            if k != self.model.accumulation_steps:
                if self.verbose:
                    print(f"\nEpoch {epoch + 1}: accumulation_steps -> {k}")
                self.model.accumulation_steps = k
                if self._rate is not None:
                    # The rate reads k from the model's variable, but JAX's
                    # compiled optimizer update sees it as a constant.
                    self.model.make_train_function(force=True)
        self._epoch_start = self._counters()

    def on_train_batch_end(self, batch, logs=None):
        if self._micro_batch_size is None and self.base_batch_size is not None:
            seen = self._samples_seen() - self._epoch_start.samples_seen
            self._micro_batch_size = max(1, round(seen / (batch + 1)))
            if self._rate is not None:
                self._rate.batch_ratio = self._batch_ratio()
                self.model.make_train_function(force=True)
        if logs is not None and self._updates() > self._fit_start_updates:
            state = self.model._accumulation_state
            logs["effective_batch_size"] = int(ops.convert_to_numpy(state.last_update_samples))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        start, end = self._epoch_start, self._counters()
        updates = end.updates - start.updates
        if updates:
            logs["effective_batch_size"] = end.applied_samples(start) / updates
        logs["learning_rate"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.accumulation_schedule is not None:
            logs["accumulation_steps"] = self.model.accumulation_steps
        if self._log_skips:
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

    def _samples_seen(self) -> int:
        return self.model._accumulation_state.total_samples_seen()

    def _updates(self) -> int:
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def _counters(self) -> _Counters:
        state = self.model._accumulation_state
        if not state.built:
            return _Counters(0, self._updates(), 0, 0)
        return _Counters(
            self._samples_seen(),
            self._updates(),
            int(ops.convert_to_numpy(state.skipped_samples)),
            int(ops.convert_to_numpy(state.window_samples)),
        )


class _Counters(NamedTuple):
    """What the epoch's ``effective_batch_size`` is computed from, read at one moment."""

    samples_seen: int
    updates: int
    skipped_samples: int
    open_window_samples: int

    def applied_samples(self, start: _Counters) -> int:
        """Samples of the updates applied since ``start``.

        An update counts all its samples, also those seen before ``start``
        (a window continued from an interrupted ``fit()``); a skipped window's
        samples count in no update.
        """
        return (
            self.samples_seen
            - start.samples_seen
            + start.open_window_samples
            - self.open_window_samples
            - (self.skipped_samples - start.skipped_samples)
        )


def _inner_optimizer(optimizer):
    return getattr(optimizer, "inner_optimizer", optimizer)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_batch_size(value) -> None:
    if not _is_integer(value) or value < 1:
        raise ValueError(
            "`base_batch_size` must be an int >= 1: the batch size, in samples, "
            "that the optimizer's learning rate was tuned for. "
            f"Received: base_batch_size={value!r}."
        )


def _check_warmup_updates(value) -> int:
    if not _is_integer(value) or value < 0:
        raise ValueError(
            "`warmup_updates` must be an int >= 0 (a number of optimizer "
            f"updates). Received: warmup_updates={value!r}."
        )
    return int(value)


def _check_warmup_epochs(value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            "`warmup_epochs` must be a finite number >= 0 (epochs, fractions "
            f"allowed). Received: warmup_epochs={value!r}."
        )
    return float(value)


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
        if not _is_integer(epoch) or epoch < 0:
            raise ValueError(
                "`accumulation_schedule` keys must be epoch indices (ints >= 0). "
                f"Received key {epoch!r}."
            )
        checked[int(epoch)] = check_accumulation_steps(
            steps, name=f"accumulation_schedule[{epoch}]"
        )
    return checked
