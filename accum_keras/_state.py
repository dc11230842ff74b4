"""The training state a window keeps between micro-batches.

Like an optimizer's slots, this state is training state, not model weights: it
is not in ``model.weights`` (a plain Keras model with the same layers accepts
the trained weights), but Keras' saving walks the model's attributes and finds
it, so ``model.save``, ``save_weights`` and ``BackupAndRestore`` keep it and a
resumed run continues exactly, even mid-window.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np

from accum_keras import _keras_internals, _overwrite
from accum_keras._keras_internals import KerasSaveable

_SCALARS = (
    # name, dtype
    ("micro_step", "int32"),
    ("window_divisor", "float32"),
    ("reference_divisor", "float32"),
    ("window_samples", "int32"),
    ("last_update_samples", "int32"),
    ("samples_seen", "int32"),
    ("samples_seen_blocks", "int32"),
    ("skipped_updates", "int32"),
    ("skipped_samples", "int32"),
)

# `samples_seen` counts modulo this block size and `samples_seen_blocks` counts
# whole blocks: two int32 words count exactly up to 2**61 samples on every
# backend (JAX has no 64-bit integers unless x64 is enabled, and float32 stops
# counting single samples at 2**24).
SAMPLES_BLOCK = 2**30


class AccumulationState(KerasSaveable):
    """Accumulators and counters of the open window.

    Attributes:
        gradients: one accumulator per trainable variable, in the order
            of ``model.trainable_variables``, of the dtype `accumulator_dtype`
            picks (float32 unless the model asks otherwise). Holds the sum of the gradients of
            the window's accumulation objectives (see `accum_keras._window`);
            for a variable flagged ``overwrite_with_gradient`` (float8 scales
            and amax histories) it is the *window maximum* of its values
            instead (see `accum_keras._overwrite`).
            Between windows it holds the last window's sum on TensorFlow
            (whose first micro-batch of a window overwrites it) and zeros on
            JAX and PyTorch (which add every micro-batch and clear it when a
            window is applied).
        accumulated_variables: the trainable variables `gradients` belong to.
        micro_step: micro-batches accumulated in the open window.
        window_divisor: ``T``, the sum of the open window's loss divisors.
        reference_divisor: ``D_ref``, the divisor of the window's first
            micro-batch (1 when it was 0).
        window_samples: samples in the open window.
        last_update_samples: samples of the last applied window, i.e. the
            effective batch size of the last update.
        samples_seen, samples_seen_blocks: samples trained on since the
            model was created, as ``samples_seen_blocks * SAMPLES_BLOCK +
            samples_seen`` (read it with `total_samples_seen`).
        skipped_updates: windows not applied because their gradient was
            non-finite (``skip_nonfinite_updates`` or a `LossScaleOptimizer`).
        skipped_samples: the samples of those windows, so that the samples
            of the applied updates can be told from the samples seen.
        accumulation_steps: ``k``, read by the compiled step so that it can be
            changed without retracing.
        accumulator_dtype: one of `accum_keras._config.ACCUMULATOR_DTYPES`,
            the dtype of accumulators created from now on.
    """

    def __init__(self, owner: Any = None, accumulator_dtype: str = "float32"):
        # The model this state belongs to, asked to (re)build the state for
        # its current variables before a load; kept weakly so that the state
        # does not keep its model alive.
        self._owner = weakref.ref(owner) if owner is not None else None
        self.accumulator_dtype = accumulator_dtype
        self.gradients: list[Any] = []
        self.accumulated_variables: list[Any] = []
        self._variable_ids: list[int] = []
        self._scalars_built = False
        # Backend bookkeeping kept here rather than on the model, where Keras
        # would track lists of variables as weights.
        self.jax_written_variables: list[Any] | None = None
        self.torch_has_gradient: list[bool] | None = None
        # Per accumulator, the optimizer of a user-written step that updates
        # its variable (see `_custom_step.record_optimizers`); saved.
        self.optimizer_indices: list[int] | None = None

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

    def add_samples_seen(self, samples: Any) -> None:
        """Counts ``samples`` more samples (stateful backends, inside or outside a step)."""
        low, blocks = count_samples(
            self.samples_seen.value, self.samples_seen_blocks.value, samples
        )
        self.samples_seen.assign(low)
        self.samples_seen_blocks.assign(blocks)

    def total_samples_seen(self) -> int:
        """Samples trained on since the model was created, exactly (a host read)."""
        if not self.built:
            return 0
        low = int(keras.ops.convert_to_numpy(self.samples_seen))
        blocks = int(keras.ops.convert_to_numpy(self.samples_seen_blocks))
        return blocks * SAMPLES_BLOCK + low

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
                accumulator_dtype(v, self.accumulator_dtype),
                _accumulator_name(v),
                # Each replica accumulates its own micro-batches; nothing
                # crosses replicas until the window is applied.
                synchronization="on_read",
                aggregation="sum",
                **_same_layout(v),
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
        order = _path_order(self.accumulated_variables)
        if order is not None and len(order) == len(self.gradients):
            store["gradients_by_path"] = np.asarray(1, "int32")
        else:
            order = list(range(len(self.gradients)))
        replica_values = self._backend_function("replica_values")
        for index, position in enumerate(order):
            accumulator = self.gradients[position]
            store[f"gradient_{index}"] = accumulator.numpy()
            # Replica-local accumulators also keep each replica's share: the
            # sum alone, split evenly on load, would round differently later.
            for replica, value in enumerate(replica_values(accumulator) or ()):
                store[_replica_key(replica, index)] = value
        if self.optimizer_indices is not None and len(self.optimizer_indices) == len(
            self.gradients
        ):
            store["optimizer_indices"] = np.asarray(
                [self.optimizer_indices[i] for i in order], "int32"
            )

    def _backend_function(self, name: str):
        """The owner's backend function ``name``, or one that does nothing."""
        owner = self._owner() if self._owner is not None else None
        backend = owner._accumulation_backend() if owner is not None else None
        return getattr(backend, name, lambda *args: None)

    def load_own_variables(self, store) -> None:
        """Restores the saved window, or starts an empty one when it cannot.

        Never raises for a checkpoint that plain Keras would load: the weights
        and the optimizer are loaded by Keras around this call, so raising
        here would leave a half-loaded model. A checkpoint without window
        state (plain Keras, ``accumulation_steps=1``) loads as an empty
        window; a saved open window whose accumulators don't match the
        model's trainable variables is dropped with one warning.
        """
        keys = list(store.keys())  # H5 stores iterate over indices, not names.
        saved_gradients = sorted(
            (k for k in keys if k.startswith("gradient_")), key=lambda k: int(k.split("_")[1])
        )
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            owner._prepare_window_for_load(with_gradients=bool(saved_gradients))
        if not self.built:
            raise ValueError(
                "The accumulation state must be built before loading it; build the model first."
            )
        order = _saved_order(store, keys, self.accumulated_variables, len(saved_gradients))
        saved_gradients = [saved_gradients[i] for i in order]
        # Older Keras hands out h5py datasets: read them as arrays.
        saved = {name: np.asarray(store[name]) for name, _ in _SCALARS if name in keys}
        _restore_samples_seen(saved)
        for name in (
            "last_update_samples",
            "samples_seen",
            "samples_seen_blocks",
            "skipped_updates",
            "skipped_samples",
        ):
            if name in saved:
                getattr(self, name).assign(saved[name])
        pending = int(saved.get("micro_step", 0))
        matches = len(saved_gradients) == len(self.gradients) and all(
            tuple(np.shape(store[k])) == tuple(a.shape)
            for k, a in zip(saved_gradients, self.gradients)
        )
        if pending and matches:
            for name in ("micro_step", "window_divisor", "reference_divisor", "window_samples"):
                getattr(self, name).assign(saved[name])
            assign_replica_values = self._backend_function("assign_replica_values")
            for key, accumulator in zip(saved_gradients, self.gradients):
                accumulator.assign(np.asarray(store[key]))
                index = int(key.split("_")[1])  # the saved order (see `_saved_order`)
                shares = []
                while _replica_key(len(shares), index) in keys:
                    shares.append(np.asarray(store[_replica_key(len(shares), index)]))
                if shares:
                    assign_replica_values(accumulator, shares)
            if "optimizer_indices" in keys:
                indices = [int(i) for i in np.asarray(store["optimizer_indices"])]
                self.optimizer_indices = [indices[i] for i in order]
        else:
            for name in ("micro_step", "window_divisor", "reference_divisor", "window_samples"):
                variable = getattr(self, name)
                variable.assign(keras.ops.zeros_like(variable.value))
            if owner is not None:
                # Backends that add every micro-batch to the accumulators
                # need them empty for the next window.
                owner._accumulation_backend().clear_accumulators(owner)
            if pending:
                from accum_keras import _lifecycle

                _lifecycle.mismatched_window_warning(
                    len(saved_gradients), pending, len(self.gradients)
                )
        if owner is not None:
            owner._window_loaded()


def _replica_key(replica: int, index: int) -> str:
    return f"replica_{replica}_gradient_{index}"


def _path_order(variables: list) -> list[int] | None:
    """The positions of ``variables`` sorted by path; None unless every path is unique.

    Keras may list a model's variables in another order after a load than
    before the save (a float8-quantized `Dense` is rebuilt from its config
    with its scales before its kernel), so accumulators are saved in the
    order of their variables' paths, which a load does not change.
    """
    paths = [getattr(v, "path", None) for v in variables]
    if not all(isinstance(p, str) for p in paths) or len(set(paths)) != len(paths):
        return None
    return sorted(range(len(paths)), key=paths.__getitem__)


def _saved_order(store, keys: list, variables: list, saved: int) -> list[int]:
    """For each of ``variables``, the index of its saved accumulator.

    By path for a file saved so (see `_path_order`), by position otherwise
    (files of accum_keras 0.3 and older, variables without unique paths).
    """
    order = _path_order(variables) if "gradients_by_path" in keys else None
    if order is None or len(order) != saved:
        return list(range(saved))
    saved_index = [0] * saved
    for index, position in enumerate(order):
        saved_index[position] = index
    return saved_index


def _restore_samples_seen(saved: dict) -> None:
    """Converts a float32 ``samples_seen`` of accum_keras 0.1 to the exact counter."""
    value = saved.get("samples_seen")
    if value is None or "samples_seen_blocks" in saved:
        return
    total = int(round(float(value)))
    saved["samples_seen"] = np.asarray(total % SAMPLES_BLOCK, "int32")
    saved["samples_seen_blocks"] = np.asarray(total // SAMPLES_BLOCK, "int32")


def count_samples(low: Any, blocks: Any, samples: Any) -> tuple[Any, Any]:
    """Adds ``samples`` to the two-word counter ``(low, blocks)`` (see `SAMPLES_BLOCK`).

    Pure `keras.ops`, so compiled steps of every backend share it.

    Args:
        low: int32 count modulo `SAMPLES_BLOCK`.
        blocks: int32 count of whole blocks.
        samples: samples to add (fewer than `SAMPLES_BLOCK`).

    Returns:
        The new ``(low, blocks)``.
    """
    total = low + keras.ops.cast(samples, "int32")
    carry = keras.ops.cast(total >= SAMPLES_BLOCK, "int32")
    return total - carry * SAMPLES_BLOCK, blocks + carry


def _zeros(shape, dtype: str, name: str, **distribution):
    return keras.Variable(
        initializer="zeros", shape=shape, dtype=dtype, trainable=False, name=name, **distribution
    )


def _accumulator_name(variable: Any) -> str:
    name: str | None = getattr(variable, "name", None)
    if _overwrite.is_overwritten(variable):
        return f"window_maximum_{name or 'value'}"
    return f"accumulated_{name or 'gradient'}"


def _same_layout(variable: Any) -> dict:
    """The layout argument that puts an accumulator where its variable is.

    Like Keras' ``Optimizer.add_variable_from_reference`` for the optimizer's
    slots. Without it a JAX accumulator would get its layout from the active
    distribution by its own path, which a `keras.distribution.LayoutMap`
    written for the model's variables does not match: it would be replicated
    where its variable is sharded. Empty when the variable has no layout (no
    distribution, TensorFlow, PyTorch): Keras 3.10's TensorFlow and PyTorch
    variables take no ``layout`` argument.

    Args:
        variable: the trainable variable the accumulator belongs to.

    Returns:
        ``{"layout": the variable's layout}``, or ``{}``.
    """
    layout = getattr(variable, "_layout", None)
    return {} if layout is None else {"layout": layout}


def accumulator_dtype(variable: Any, choice: str) -> str:
    """The dtype of ``variable``'s accumulator under the model's ``accumulator_dtype``.

    Args:
        variable: a trainable variable.
        choice: one of `accum_keras._config.ACCUMULATOR_DTYPES`.

    Returns:
        ``choice``, or the variable's own dtype for ``"variable"`` and for a
        variable Keras overwrites with its gradient (its window maximum must
        equal the big batch's value, not a rounding of it).
    """
    if choice == "variable" or _overwrite.is_overwritten(variable):
        return keras.backend.standardize_dtype(variable.dtype)
    return choice
