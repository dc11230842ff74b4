"""TensorFlow mechanics of the accumulating ``train_step``.

What a window *is* lives in `accum_keras._window`; this module only says how a
TensorFlow step computes the gradient of a micro-batch's accumulation
objective, adds it to the accumulators and, every ``k``-th micro-batch, hands
the window's gradient to the optimizer — inside the compiled step, so
``steps_per_execution`` and XLA work unchanged.

Under ``tf.distribute`` each replica accumulates its own micro-batches into
its own (``on_read``) accumulators; only a scalar crosses replicas per
micro-batch (the loss divisor, for the global normalization), and the
gradients are all-reduced once per window, by ``optimizer.apply``. The update
itself must be decided in cross-replica context: an ``optimizer.apply`` (which
calls ``merge_call``) inside a per-replica ``tf.cond`` is not allowed.

Under a `LossScaleOptimizer` gradients are unscaled before they are
accumulated (in float32) and scaled back by the same factor when the window is
handed to the optimizer, which then unscales them, checks them and adapts its
scale as for any step; a window that saw a non-finite gradient is therefore
not applied, and it is counted in ``skipped_updates``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf
from keras import tree
from keras.utils import unpack_x_y_sample_weight

from accum_keras import _apply, _keras_internals, _overwrite, _sparse, _split, _window
from accum_keras._backends import _stateful

#: The step assigns variables: a user-written ``train_step``'s optimizer
#: calls can be intercepted and accumulated (`accum_keras._custom_step`).
STATEFUL_STEPS = True


def distribution_scope(model):
    """The scope accumulators are created in."""
    return model.distribute_strategy.scope()


def num_samples(x) -> Any:
    """Samples in a micro-batch, counted as Keras' loss tracker counts them."""
    first = next(leaf for leaf in tree.flatten(x) if leaf is not None)
    return tf.shape(first)[0]


def first_local_batch(model, iterator):
    """The first batch of a distributed epoch iterator, as one replica sees it."""
    strategy = model.distribute_strategy
    for _, _, batches in iterator:
        return tree.map_structure(
            lambda value: (
                strategy.experimental_local_results(value)[0]
                if isinstance(value, tf.distribute.DistributedValues)
                else value
            ),
            next(batches),
        )
    return None


def _num_replicas(model) -> int:
    return model.distribute_strategy.num_replicas_in_sync


def _sum_over_replicas(value):
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def train_step(model, data):
    """One micro-batch: accumulate its gradient, apply the window when full.

    The single-program step (what `TrainFunction`'s closing program runs
    without XLA); `TrainFunction` runs `accumulate_micro_batch` alone on
    micro-batches that cannot close a window.
    """
    logs = accumulate_micro_batch(model, data)
    _apply_window_when_full(model, lambda: _apply_and_report(model))
    return logs


def accumulate_micro_batch(model, data):
    """One micro-batch: add its gradient to the window, never apply it.

    Returns:
        The step's logs, as Keras' ``train_step`` returns them.
    """
    model._prepare_accumulation_while_tracing(data)
    state = model._accumulation_state
    replicas = _num_replicas(model)
    is_first = tf.equal(state.micro_step.value, 0)
    x, y, sample_weight, samples, y_pred, weights = _add_micro_batch(
        model,
        data,
        is_first,
        accumulation_steps=state.accumulation_steps.value,
        sum_over_replicas=_sum_over_replicas,
        num_replicas=replicas,
    )

    # The counters wait for the data (see `after_data`: unknown-length datasets).
    with after_data(x):
        global_samples = _sum_over_replicas(samples)
        state.window_divisor.assign_add(weights.divisor)
        state.reference_divisor.assign(weights.reference_divisor)
        state.window_samples.assign_add(global_samples)
        state.add_samples_seen(global_samples)
        state.micro_step.assign_add(1)
    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    if _keras_internals.in_multi_worker_mode(model.distribute_strategy):
        # Keras 3.15 averages step logs across workers along axis 0, which
        # fails for scalars (plain Keras models crash there too).
        logs = tree.map_structure(lambda v: tf.reshape(v, [-1]) if v.shape.rank == 0 else v, logs)
    return logs


def split_train_step(model, data):
    """The in-step mode: the whole batch's step, run as micro-batches in a loop.

    Splits the batch (`accum_keras._split`), accumulates each full
    micro-batch in a `tf.while_loop` (one traced body, whatever the number of
    micro-batches; it compiles under XLA), then the remainder micro-batch,
    and applies the step's window through `apply_window`. The loss tracker is
    updated once, with the batch's loss and size, as Keras' step does; the
    compiled metrics are updated per micro-batch (each is a sum over samples,
    so the step adds what the whole batch adds).

    Under a distribution strategy each replica splits its own batch, and the
    loop stays local to the replica: a synchronization inside it (an
    all-reduce, or a write of a mirrored variable) would need a
    ``merge_call``, which TensorFlow does not allow inside control flow. So
    the loop weighs each micro-batch by the replica's own divisors (its
    ``D_ref`` is its own), carries their sum, and the one all-reduce of the
    step (the divisors' global sum) comes after it; each replica then scales
    its accumulators by its ``D_ref`` over the global divisor, and
    ``optimizer.apply`` sums the replicas' gradients as in plain Keras. The
    window's counters are written once, after the loop.

    Returns:
        The step's logs, as Keras' ``train_step`` returns them.
    """
    model._prepare_accumulation_while_tracing(data)
    state = model._accumulation_state
    size = model.micro_batch_size
    x, _, _ = unpack_x_y_sample_weight(data)
    first = next(leaf for leaf in tree.flatten(x) if leaf is not None)
    # A static batch size (XLA, fixed-size datasets) decides the split while
    # tracing; a `None` one (graphs without XLA) at run time.
    batch = first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]
    full, remainder = _split.counts(batch, size)
    if tf.is_tensor(full):
        has_remainder = remainder > 0
        count = full + tf.cast(has_remainder, full.dtype)
    else:
        has_remainder = bool(remainder)
        count = full + int(has_remainder)

    def run(micro_batch, index, sums):
        objective, divisor, reference = _accumulate_split_micro_batch(
            model, micro_batch, index, count, divisor_so_far=sums[1], reference=sums[2]
        )
        return sums[0] + objective, sums[1] + divisor, reference

    def body(index, *sums):
        micro_batch = _split.full_micro_batch(data, index, full, size)
        return (index + 1, *run(micro_batch, index, sums))

    zero = tf.constant(0.0)
    start = tf.zeros_like(full) if tf.is_tensor(full) else tf.constant(0)
    _, *sums = tf.while_loop(
        lambda index, *_: index < full,
        body,
        (start, zero, zero, tf.constant(1.0)),
        # The body writes the accumulators: one micro-batch at a time.
        parallel_iterations=1,
    )

    def run_remainder():
        return run(_split.remainder_micro_batch(data, full, size), full, sums)

    if tf.is_tensor(has_remainder):
        sums = tf.cond(has_remainder, run_remainder, lambda: tuple(sums))
    elif has_remainder:
        sums = run_remainder()
    objective_sum, divisor_sum, reference = sums

    window_divisor = _sum_over_replicas(divisor_sum)
    samples = num_samples(x)
    global_samples = _sum_over_replicas(samples)
    state.window_divisor.assign(window_divisor)
    state.reference_divisor.assign(reference)
    state.window_samples.assign(global_samples)
    state.add_samples_seen(global_samples)
    state.micro_step.assign(tf.cast(count, tf.int32))
    loss = _window.split_step_loss(objective_sum, reference, divisor_sum)
    _keras_internals.loss_tracker(model).update_state(loss, sample_weight=samples)
    apply_window(model, scale=_window.update_scale(window_divisor, reference))
    logs = model.get_metrics_result()
    if _keras_internals.in_multi_worker_mode(model.distribute_strategy):
        logs = tree.map_structure(lambda v: tf.reshape(v, [-1]) if v.shape.rank == 0 else v, logs)
    return logs


def _accumulate_split_micro_batch(model, data, index, count, divisor_so_far, reference):
    """Adds one micro-batch of a split step to the replica's accumulators.

    Touches only replica-local state (the accumulators, the metrics), see
    `split_train_step`.

    Args:
        model: the `AccumulatingModel`.
        data: the micro-batch.
        index: its place in the step (0 opens the window).
        count: the number of micro-batches in the step (``k`` of
            `_window.micro_batch_weights`: a step of equal micro-batches
            then gives each backward pass the whole batch's scale).
        divisor_so_far: the replica's divisors of the step's earlier
            micro-batches.
        reference: the step's ``D_ref`` (set by micro-batch 0).

    Returns:
        ``(objective, divisor, reference)`` as float32 scalars: the
        micro-batch's objective and the replica's divisor (for the step's
        loss and update scale) and the step's ``D_ref``.
    """
    x, y, sample_weight, _, y_pred, weights = _add_micro_batch(
        model,
        data,
        tf.equal(index, 0),
        accumulation_steps=count,
        num_replicas=_num_replicas(model),
        track_loss=False,
        window_divisor=divisor_so_far,
        reference_divisor=reference,
    )
    model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    return (
        tf.cast(weights.objective, tf.float32),
        tf.cast(weights.divisor, tf.float32),
        tf.cast(weights.reference_divisor, tf.float32),
    )


def _add_micro_batch(model, data, is_first, **forward_options):
    """Runs one micro-batch forward and backward and adds its gradient to the accumulators.

    Shared by the streaming step and the in-step loop: the loss scale, the
    sparse-gradient record and the accumulation rules are the same for both.

    Args:
        model: the `AccumulatingModel`.
        data: the micro-batch.
        is_first: boolean tensor, whether it opens the window (or the step).
        **forward_options: `_stateful.forward`'s keyword arguments.

    Returns:
        ``(x, y, sample_weight, samples, y_pred, weights)``: the unpacked
        micro-batch, its size, the predictions and the
        `_window.MicroBatchWeights`.
    """
    state = model._accumulation_state
    optimizer = model.optimizer
    x, y, sample_weight = unpack_x_y_sample_weight(data)
    samples = num_samples(x)
    with tf.GradientTape() as tape:
        y_pred, weights = _stateful.forward(
            model, x, y, sample_weight, samples, is_first, **forward_options
        )
        loss_scale = _loss_scale(optimizer)
        objective = weights.objective
        if loss_scale is not None:
            objective = objective * tf.cast(loss_scale, objective.dtype)
    variables = state.accumulated_variables
    gradients = tape.gradient(objective, variables)
    model._accumulation_has_gradient = [g is not None for g in gradients]
    _sparse.record_sparse_gradients(model, variables, gradients)
    replicas = forward_options.get("num_replicas", 1)
    _accumulate(state.gradients, gradients, loss_scale, replicas, is_first, variables)
    return x, y, sample_weight, samples, y_pred, weights


@contextlib.contextmanager
def after_data(x) -> Iterator[None]:
    """Ops created inside run only once the micro-batch ``x`` has been read.

    When a dataset of unknown length runs out, Keras' last call of the step
    fails to read a batch; stateful ops that do not wait for the data (a
    counter's ``assign_add(1)``, a divisor that is a constant for a static
    batch size) would still run, and open a window with no micro-batch in it.
    """
    leaves = [leaf for leaf in tf.nest.flatten(x, expand_composites=True) if leaf is not None]
    with tf.control_dependencies(leaves[:1]):
        yield


class TrainFunction:
    """The accumulating model's ``train_function``: two programs, chosen on the host.

    Keras calls ``train_function(iterator)`` once per ``steps_per_execution``
    micro-batches. Most calls cannot close a window, and for those this runs
    a program that only accumulates: it contains no optimizer update, not
    even an untaken one. Under XLA that matters: a conditional that writes
    the weights and the optimizer's slots costs time even when its branch is
    not taken (XLA threads every variable it may write through the
    conditional), which made the accumulating step slower than a plain one.

    - ``accumulate``: `accumulate_micro_batch` on each micro-batch of the call.
    - ``accumulate_and_apply``: the same, each micro-batch followed by the
      window update when the window is full. Under XLA the accumulation and
      the update are compiled separately and the decision between them is
      made by the (non-XLA) TensorFlow graph around them, so an update that
      is not taken costs nothing there either; with ``steps_per_execution``
      > 1 this program is exact whichever of its micro-batches closes a
      window.

    The choice needs no device synchronization: a host mirror of the
    window's ``micro_step`` (``model._accumulation_host_micro_step``) is
    advanced by the number of micro-batches each call runs, and re-read from
    the variable only when it may have changed outside this function (it is
    set to None at ``fit()`` start, when window state is built or loaded, and
    to 0 when a pending window is applied). A call may run fewer micro-batches
    than ``steps_per_execution`` only when its dataset runs out, which ends
    the epoch, and the epoch's end applies the pending window.

    Under a distribution strategy (where replicas synchronize inside the
    step, which a nested `tf.function` may not do) and with a
    `LossScaleOptimizer` each program is traced (and compiled) whole, the
    update under a `tf.cond` in the second one.

    Args:
        model: the `AccumulatingModel`, with ``accumulation_steps`` > 1.
    """

    def __init__(self, model):
        self._model = model

        def accumulate_step(data):
            return accumulate_micro_batch(model, data)

        def update_step():
            return _apply_and_report(model)

        # Under a distribution strategy the step synchronizes replicas
        # (all-reduces, `merge_call`), which a nested `tf.function` may not;
        # there each program is traced (and compiled) whole, as Keras does.
        # The same holds for a `LossScaleOptimizer`, whose update decides
        # through `merge_call` too.
        separate = (
            not model.run_eagerly
            and getattr(model, "_distribute_strategy", None) is None
            and not _apply.is_loss_scale_optimizer(model.optimizer)
        )
        if separate:
            # Each traced once, shared by both programs. Without AutoGraph,
            # as Keras traces its own steps (`do_not_convert`): the step runs
            # the user's `call()` and losses as plain Keras does, so their
            # errors keep their types (AutoGraph wraps them in `StagingError`),
            # and nothing in them is converted that Keras leaves as it is.
            jit_compile = bool(model.jit_compile)
            accumulate_step = tf.function(
                accumulate_step, jit_compile=jit_compile, reduce_retracing=True, autograph=False
            )
            update_step = tf.function(update_step, jit_compile=jit_compile, autograph=False)

        def accumulate_then_update_when_full(data):
            logs = accumulate_step(data)
            _apply_window_when_full(model, update_step)
            return logs

        # Keras' `_make_function` adds the iterator, `steps_per_execution`
        # loop and distribution around a step, compiling the step with XLA
        # when the model does; here the XLA parts are compiled above and the
        # graph around them must stay outside XLA.
        outer = _keras_internals.jit_compile_off(model) if separate else contextlib.nullcontext()
        with outer:
            self.accumulate = _keras_internals.make_function(model, accumulate_step)
            self.accumulate_and_apply = _keras_internals.make_function(
                model, accumulate_then_update_when_full
            )

    def __call__(self, iterator):
        model = self._model
        steps = model.steps_per_execution
        if not isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            # `train_on_batch` and custom loops pass a Python iterable, of
            # which Keras runs up to `steps_per_execution` items.
            iterator = [
                _split_over_replicas(model, data) for data in itertools.islice(iterator, steps)
            ]
            steps = len(iterator)
        if getattr(model, "_accumulation_host_micro_step", None) is None:
            _sparse.new_fit(model)  # forgotten at fit() start (and when state is loaded)
        micro_step = _host_micro_step(model)
        k = model.accumulation_steps
        if micro_step + steps < k:
            logs = self.accumulate(iterator)
        else:
            logs = self.accumulate_and_apply(iterator)
        model._accumulation_host_micro_step = micro_step_after(micro_step, steps, k)
        _sparse.warn_once_per_fit(model)
        return logs


def _split_over_replicas(model, data):
    """A ``train_on_batch`` batch, split between the replicas as ``fit()`` splits its batches.

    Keras' ``train_on_batch`` hands every replica the whole batch. For one
    update that is still the batch's (each replica's mean gradient, scaled by
    1 / replicas, summed), but a window sums its micro-batches' gradients and
    divisors over replicas: a whole micro-batch on every replica would count
    once per replica, and outweigh the micro-batches ``fit()`` split in the
    same window. Each replica gets its share of the rows (the first ones one
    row more when they do not divide), as a distributed dataset gives them.
    """
    strategy = model.distribute_strategy
    replicas = strategy.num_replicas_in_sync
    if replicas == 1 or _keras_internals.in_multi_worker_mode(strategy):
        # Several workers: each passes its own batch, already its share.
        return data
    rows = int(next(leaf for leaf in tree.flatten(data) if leaf is not None).shape[0])
    sizes = [rows // replicas + (index < rows % replicas) for index in range(replicas)]
    bounds = list(itertools.accumulate(sizes, initial=0))

    def share(context):
        replica = context.replica_id_in_sync_group
        start, stop = bounds[replica], bounds[replica + 1]
        return tree.map_structure(lambda value: None if value is None else value[start:stop], data)

    return strategy.experimental_distribute_values_from_function(share)


def micro_step_after(micro_step: int, steps: int, accumulation_steps: int) -> int:
    """The window's ``micro_step`` after ``steps`` more micro-batches.

    Follows the step's rule: each micro-batch adds 1, and a window whose
    count reaches ``accumulation_steps`` is applied (count 0).
    """
    first_close = max(accumulation_steps - micro_step, 1)
    if steps < first_close:
        return micro_step + steps
    return (steps - first_close) % accumulation_steps


def _host_micro_step(model) -> int:
    micro_step = getattr(model, "_accumulation_host_micro_step", None)
    if micro_step is None:
        # The one synchronization: after fit() starts or state was loaded.
        micro_step = int(model._accumulation_state.micro_step.numpy())
        model._accumulation_host_micro_step = micro_step
    return micro_step


def _loss_scale(optimizer):
    """The factor ``optimizer.scale_loss`` multiplies by, or None when it has none."""
    if _apply.is_loss_scale_optimizer(optimizer) or getattr(optimizer, "loss_scale_factor", None):
        return tf.cast(optimizer.scale_loss(tf.constant(1.0)), "float32")
    return None


def _accumulate(accumulators, gradients, loss_scale, replicas: int, is_first, variables) -> None:
    """Adds a micro-batch's gradients to the accumulators.

    The first micro-batch of a window overwrites them instead, so applying a
    window needs no zeroing pass: zeroing every accumulator at once would
    materialize a full-size zero tensor per accumulator, one more copy of the
    weights at peak memory. Variables Keras overwrites with their gradient
    keep the window maximum instead (`accum_keras._overwrite`).
    """
    pairs, maxima = [], []
    for a, g, v in zip(accumulators, gradients, variables):
        if g is not None:
            (maxima if _overwrite.is_overwritten(v) else pairs).append((a, g))

    def unscaled(values, dtype="float32"):
        values = tf.cast(values, _summing_dtype(dtype))
        if loss_scale is not None:
            values = values / tf.cast(loss_scale, values.dtype)
        return tf.cast(values, dtype)

    def write(overwrite: bool):
        for accumulator, gradient in pairs:
            dtype = accumulator.dtype
            if isinstance(gradient, tf.IndexedSlices) and replicas == 1:
                if overwrite:
                    accumulator.assign(tf.zeros_like(accumulator.value))
                if _summing_dtype(dtype) == dtype:
                    accumulator.value.scatter_add(
                        tf.IndexedSlices(
                            unscaled(gradient.values, dtype), gradient.indices, gradient.dense_shape
                        )
                    )
                else:
                    _add_rows_rounded_once(accumulator, gradient, unscaled)
            elif overwrite:
                accumulator.assign(unscaled(tf.convert_to_tensor(gradient), dtype))
            elif _summing_dtype(dtype) == dtype:
                # Replica-local (on-read) variables take dense updates only.
                accumulator.assign_add(unscaled(tf.convert_to_tensor(gradient), dtype))
            else:
                # Half-precision accumulators: the sum is formed in float32
                # and rounded once, not the gradient and then the sum.
                total = tf.cast(accumulator.value, "float32") + unscaled(
                    tf.convert_to_tensor(gradient)
                )
                accumulator.assign(tf.cast(total, dtype))
        for accumulator, value in maxima:
            # Neither unscaled nor summed: a value, not a gradient.
            accumulator.assign(
                _overwrite.window_maximum(accumulator.value, value, tf.constant(overwrite))
            )
        return tf.constant(True)

    tf.cond(is_first, lambda: write(overwrite=True), lambda: write(overwrite=False))


def _add_rows_rounded_once(accumulator, gradient, unscaled) -> None:
    """Adds sparse rows to a half-precision accumulator by the dense rounding rule.

    A token's occurrences are summed in float32 with the rows they update, and
    each touched row is rounded once: adding occurrence by occurrence in half
    precision would round after every one (docs/performance.md).
    """
    rows, positions = tf.unique(gradient.indices)
    sums = tf.math.unsorted_segment_sum(unscaled(gradient.values), positions, tf.shape(rows)[0])
    total = tf.cast(tf.gather(accumulator.value, rows), "float32") + sums
    accumulator.value.scatter_update(
        tf.IndexedSlices(tf.cast(total, accumulator.dtype), rows, gradient.dense_shape)
    )


def _window_is_full(state):
    return state.micro_step.value >= state.accumulation_steps.value


def _apply_window_when_full(model, apply) -> None:
    """Runs ``apply()`` (replica context, returns a bool tensor) if the window is full."""
    state = model._accumulation_state
    if _keras_internals.strategy_supports_no_merge_call():
        tf.cond(_window_is_full(state), apply, lambda: tf.constant(False))
        return

    def decide_for_all_replicas(distribution):
        # The counters are equal on every replica: decide once, then run the
        # update on each replica so that its all-reduce can happen.
        def apply_on_every_replica():
            distribution.extended.call_for_each_replica(apply)
            return tf.constant(True)

        tf.cond(_window_is_full(state), apply_on_every_replica, lambda: tf.constant(False))

    tf.distribute.get_replica_context().merge_call(decide_for_all_replicas)


def _apply_and_report(model):
    apply_window(model)
    return tf.constant(True)


def apply_window(model, scale=None) -> None:
    """Hands the window's gradient to the optimizer and opens a new window.

    Runs in replica context. ``scale`` is the factor from the accumulators to
    the window's gradient, by default the window state's (the in-step mode
    gives each replica its own, see `split_train_step`). Variables that received no gradient in the
    traced step get `None`, exactly as plain Keras passes them, so the
    optimizer skips them. The skip, statistics and counters are
    `accum_keras._apply.apply_window`'s.
    """
    state = model._accumulation_state
    optimizer = model.optimizer
    has_gradient = getattr(model, "_accumulation_has_gradient", None)
    if has_gradient is None or len(has_gradient) != len(state.gradients):
        has_gradient = [True] * len(state.gradients)
    if scale is None:
        scale = _window.update_scale(state.window_divisor.value, state.reference_divisor.value)
    loss_scale = _loss_scale(optimizer)
    if loss_scale is not None:
        # The optimizer unscales what it is given, as for a plain step.
        scale = scale * loss_scale
    gradients = [
        # Scaled in float32 (half-precision accumulators too), cast once; a
        # window maximum is handed over as it is (`accum_keras._overwrite`).
        (
            None
            if not present
            else accumulator.value
            if _overwrite.is_overwritten(variable)
            else _scaled(accumulator.value, scale, variable.dtype)
        )
        for accumulator, variable, present in zip(
            state.gradients, state.accumulated_variables, has_gradient
        )
    ]
    _apply.apply_window(model, [(optimizer, gradients, state.accumulated_variables)])


def _summing_dtype(dtype) -> str:
    """float32 for half-precision accumulators, their own dtype otherwise."""
    return "float64" if tf.as_dtype(dtype) == tf.float64 else "float32"


def _scaled(accumulated, scale, dtype):
    """``accumulated * scale`` computed in the summing dtype, cast once to ``dtype``."""
    wide = _summing_dtype(accumulated.dtype)
    return tf.cast(tf.cast(accumulated, wide) * tf.cast(scale, wide), dtype)


def _local_replicas(variable) -> tuple:
    """The replicas' components of a replica-local variable, when all are in this process."""
    value = variable.value
    if not isinstance(value, tf.distribute.DistributedValues):
        return ()
    components = tuple(value.values)
    replicas = value.distribute_strategy.num_replicas_in_sync
    # Several workers: this process holds only its own replicas' shares.
    return components if 1 < len(components) == replicas else ()


def replica_values(variable) -> list | None:
    """Each replica's share of a replica-local accumulator (for saving), or None."""
    components = _local_replicas(variable)
    return [component.numpy() for component in components] or None


def assign_replica_values(variable, values) -> None:
    """Gives each replica its saved share, when the replicas are as many as when saved.

    Otherwise the accumulator keeps the even split of the saved sum that
    ``assign`` made.
    """
    components = _local_replicas(variable)
    if len(components) == len(values):
        for component, value in zip(components, values):
            component.assign(value)


def check_skip_nonfinite_supported(model) -> None:
    """Every strategy supports ``skip_nonfinite_updates`` (see `run_when`)."""


def all_finite(gradients: Sequence[Any]):
    """Whether every gradient is finite, on every replica (a boolean tensor)."""
    present = [g for g in gradients if g is not None]
    if not present:
        return tf.constant(True)
    finite = [tf.reduce_all(tf.math.is_finite(g)) for g in present]
    # A non-finite value on any replica poisons the global window.
    local = tf.cast(tf.reduce_all(tf.stack(finite)), "int32")
    return tf.equal(
        _sum_over_replicas(local), tf.distribute.get_replica_context().num_replicas_in_sync
    )


def reads_trainable_variables_per_step(model) -> bool:
    """Compiled steps keep the variables they were traced with; eager ones don't."""
    return bool(model.run_eagerly)


def executing_eagerly() -> bool:
    """Whether the step runs eagerly (``run_eagerly=True``), not being traced."""
    return tf.executing_eagerly()


def clear_accumulators(model) -> None:
    """Nothing to clear: a window's first micro-batch overwrites the accumulators."""
    del model  # A body of its own: AutoGraph cannot convert a docstring-only function.


def make_train_function(model) -> TrainFunction:
    """The ``train_function`` of an accumulating model (see `TrainFunction`)."""
    return TrainFunction(model)


class _ApplyPending:
    """Applies a model's open window now (see `make_apply_function`).

    A callable object rather than a closure: TensorFlow counts the traces of
    all functions with the same code together, so each model tracing its own
    closure (once, as it must) would add up to a "triggered tf.function
    retracing" warning after a few models; an object is counted on its own.
    """

    def __init__(self, model):
        self._model = model
        self._strategy = model.distribute_strategy

    def __call__(self):
        if tf.distribute.in_cross_replica_context():
            self._strategy.run(apply_window, args=(self._model,))
        else:
            # Called from inside an eager step (see `executing_eagerly`).
            apply_window(self._model)


def make_apply_function(model):
    """A function that applies the open window now (used at epoch ends).

    Traced once per model and optimizer (the model keeps it until ``compile()``
    or a rebuilt train function replaces what it captured).
    """
    apply_pending = _ApplyPending(model)
    if model.run_eagerly:
        return apply_pending
    # Without AutoGraph, as Keras' own steps: the window's end is graph code,
    # and converting it logs "could not transform" warnings under strategies.
    return tf.function(apply_pending, autograph=False)


def run_when(condition, function) -> None:
    """Runs ``function`` (which returns nothing) when ``condition`` holds, inside the step.

    ``condition`` must be equal on every replica (`all_finite` is global).
    Under a strategy whose replicas synchronize through ``merge_call``
    (`MirroredStrategy` on CPUs and GPUs), ``function`` may synchronize too
    (``optimizer.apply`` all-reduces), which is not allowed under a
    per-replica `tf.cond`: there the condition is decided in cross-replica
    context and ``function`` run for each replica, as Keras'
    `LossScaleOptimizer` decides its skip.
    """

    def run():
        function()
        return tf.constant(True)

    context = tf.distribute.get_replica_context()
    if context is None or _keras_internals.strategy_supports_no_merge_call():
        tf.cond(condition, run, lambda: tf.constant(False))
        return

    # Not converted by AutoGraph (as Keras' steps are not): the update is
    # plain graph code, and converting it would log warnings about it.
    @tf.autograph.experimental.do_not_convert
    def run_own(own_function):
        own_function()

    @tf.autograph.experimental.do_not_convert
    def decide_for_all_replicas(distribution, condition, function):
        # ``function`` arrives as each replica's own (it closes over that
        # replica's values), and each replica runs its own.
        def run_on_every_replica():
            distribution.extended.call_for_each_replica(run_own, args=(function,))
            return tf.constant(True)

        # Equal on every replica: the first one's value decides.
        first = distribution.experimental_local_results(condition)[0]
        tf.cond(first, run_on_every_replica, lambda: tf.constant(False))

    context.merge_call(decide_for_all_replicas, args=(condition, function))
