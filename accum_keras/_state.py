"""The training state a window keeps between micro-batches.

Like an optimizer's slots, this state is training state, not model weights: it
is not in ``model.weights`` (a plain Keras model with the same layers accepts
the trained weights), but Keras' saving walks the model's attributes and finds
it, so ``model.save``, ``save_weights`` and ``BackupAndRestore`` keep it and a
resumed run continues exactly, even mid-window.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import keras

from accum_keras import _keras_internals
from accum_keras._keras_internals import KerasSaveable

_SCALARS = (
    # name, dtype
    ("micro_step", "int32"),
    ("window_divisor", "float32"),
    ("reference_divisor", "float32"),
    ("window_samples", "int32"),
    ("last_update_samples", "int32"),
    ("samples_seen", "float32"),
    ("skipped_updates", "int32"),
)


class AccumulationState(KerasSaveable):
    """Accumulators and counters of the open window.

    Attributes:
        gradients: one float32 accumulator per trainable variable, in the order
            of ``model.trainable_variables``. Holds the sum of the gradients of
            the window's accumulation objectives (see `accum_keras._window`);
            the first micro-batch of a window overwrites it, so between windows
            it still holds the last window's sum.
        accumulated_variables: the trainable variables `gradients` belong to.
        micro_step: micro-batches accumulated in the open window.
        window_divisor: ``T``, the sum of the open window's loss divisors.
        reference_divisor: ``D_ref``, the divisor of the window's first
            micro-batch (1 when it was 0).
        window_samples: samples in the open window.
        last_update_samples: samples of the last applied window, i.e. the
            effective batch size of the last update.
        samples_seen: samples trained on since the model was created (float32,
            for logging).
        skipped_updates: windows not applied because a micro-batch produced a
            non-finite gradient under a `LossScaleOptimizer`.
        accumulation_steps: ``k``, read by the compiled step so that it can be
            changed without retracing.
    """

    def __init__(self, builder: Callable[[bool], None] | None = None):
        # `builder(with_gradients)` builds this state for its model; kept as a
        # weak method so that the state does not keep its model alive.
        self._builder = weakref.WeakMethod(builder) if builder is not None else None
        self.gradients: list[Any] = []
        self.accumulated_variables: list[Any] = []
        self._variable_ids: list[int] = []
        self._scalars_built = False
        # Backend bookkeeping kept here rather than on the model, where Keras
        # would track lists of variables as weights.
        self.jax_written_variables: list[Any] | None = None
        self.torch_has_gradient: list[bool] | None = None

    def _obj_type(self):
        # Keras' saving walks children by type and only knows its own types;
        # nothing below this object needs walking: its variables are saved by
        # `save_own_variables`.
        return _keras_internals.SAVEABLE_OBJ_TYPE

    @property
    def built(self) -> bool:
        return self._scalars_built

    def build_scalars(self, accumulation_steps: int) -> None:
        """Creates the counters; call inside the model's distribution scope."""
        if self._scalars_built:
            return
        # Counters hold the same value on every replica (their updates are
        # computed from all-reduced quantities), so the first replica's
        # write stands for all.
        for name, dtype in _SCALARS:
            setattr(self, name, _zeros((), dtype, name, aggregation="only_first_replica"))
        self.accumulation_steps = keras.Variable(
            accumulation_steps,
            dtype="int32",
            trainable=False,
            name="accumulation_steps",
            aggregation="only_first_replica",
        )
        self._scalars_built = True

    def follow(self, trainable_variables: Iterable[Any]) -> bool:
        """Makes `gradients` match ``trainable_variables``.

        Accumulators of variables that stopped being trainable are dropped,
        new trainable variables get a zero accumulator and the others are kept.

        Returns:
            Whether anything changed.
        """
        trainable_variables = list(trainable_variables)
        wanted = [id(v) for v in trainable_variables]
        if wanted == self._variable_ids:
            return False
        existing = dict(zip(self._variable_ids, self.gradients))
        self.gradients = [
            existing[id(v)]
            if id(v) in existing
            else _zeros(
                v.shape,
                "float32",
                _accumulator_name(v),
                # Each replica accumulates its own micro-batches; nothing
                # crosses replicas until the window is applied.
                synchronization="on_read",
                aggregation="sum",
            )
            for v in trainable_variables
        ]
        self._variable_ids = wanted
        self.accumulated_variables = trainable_variables
        return True

    def follows(self, trainable_variables: Iterable[Any]) -> bool:
        return [id(v) for v in trainable_variables] == self._variable_ids

    def variables(self) -> list[Any]:
        scalars = [getattr(self, name) for name, _ in _SCALARS] if self.built else []
        return scalars + list(self.gradients)

    def save_own_variables(self, store) -> None:
        for name, _ in _SCALARS if self.built else ():
            store[name] = getattr(self, name).numpy()
        for index, accumulator in enumerate(self.gradients):
            store[f"gradient_{index}"] = accumulator.numpy()

    def load_own_variables(self, store) -> None:
        # H5 stores iterate over indices, not names: use keys().
        saved_gradients = [k for k in store.keys() if k.startswith("gradient_")]  # noqa: SIM118
        builder = self._builder() if self._builder is not None else None
        if builder is not None:
            builder(bool(saved_gradients))
        if not self.built:
            raise ValueError(
                "The accumulation state must be built before loading it; build the model first."
            )
        if len(saved_gradients) != len(self.gradients):
            raise ValueError(
                f"The saved accumulation state has {len(saved_gradients)} "
                f"accumulators but the model has {len(self.gradients)} trainable "
                "variables. Load it into a model with the same trainable variables."
            )
        for name, _ in _SCALARS:
            if name in store.keys():  # noqa: SIM118
                getattr(self, name).assign(store[name])
        for index, accumulator in enumerate(self.gradients):
            accumulator.assign(store[f"gradient_{index}"])


def _zeros(shape, dtype: str, name: str, **distribution):
    return keras.Variable(
        initializer="zeros", shape=shape, dtype=dtype, trainable=False, name=name, **distribution
    )


def _accumulator_name(variable: Any) -> str:
    name: str | None = getattr(variable, "name", None)
    return f"accumulated_{name or 'gradient'}"
