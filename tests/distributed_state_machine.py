"""The randomized window test under Keras' distribution features, run inside a worker process.

`tests/test_window_state_machine.py` draws configurations and window events
against a reference written from the specification, on one device. This
module runs the same machine (its configurations' pieces, its events, its
reference and its invariant: `WindowLife`) under a distribution:

- TensorFlow: `tf.distribute.MirroredStrategy` on two logical CPUs
  (`tests/distributed/mirrored_worker.py` runs it). Models are built and
  compiled in the strategy's scope, ``fit()`` and ``train_on_batch`` run
  outside it (the pattern docs/distributed.md shows). The reference is
  plain Keras on one device, on the global big batch; micro-batches have 4
  rows, 2 per replica (see ``TF_MICRO``).
- JAX: `keras.distribution.DataParallel` on 8 host devices, or
  `ModelParallel` on a (4, 2) ``("batch", "model")`` mesh with a broad
  `LayoutMap` (``.*kernel`` and ``.*bn.*``, every kernel and every
  BatchNormalization variable sharded) or a narrow one (one layer's variable
  path) (`tests/backends/jax_model_parallel_worker.py` runs it). The
  distribution is set for the whole example, the reference (plain Keras)
  included: a JAX array is one global array, so the single-device reference
  of the machine holds unchanged.

What is drawn: the model kind, BatchNormalization (plain or
`AccumBatchNormalization`, with every argument), ``skip_nonfinite_updates``
with poisoned micro-batches, streaming ``accumulation_steps`` or the in-step
``micro_batch_size``, an `AccumulationCallback` (linear scaling or none: its
logged ``effective_batch_size`` must be global), on TensorFlow compiled or
eager steps, and on JAX the distribution and the layout key (jitted steps). Events: ``train_on_batch`` micro-batches, fits (short last
windows, stops, interrupts), apply, discard, save and load into a fresh model
(built in the scope). Everything else stays at the single-device test's
defaults (float32, no Embedding, no loss scaling): those axes do not meet the
distribution in code of ours that the single-device test does not run.

Left out, each with its reason: on TensorFlow, user-written train steps
(refused under a strategy, docs/your-model.md), and BatchNormalization is drawn
with ``synchronized=True`` (without it each replica normalizes its own share
of the micro-batch, which the machine's NumPy reference does not model) and
not in the in-step mode (each replica splits its own share of the batch into
micro-batches, not the global split that the reference redoes); on JAX, a user
step is the one ending in ``super().train_step`` (as on one device), and
micro-batches have 8 rows instead of 3 (a batch must divide over the 8
devices, or the mesh's batch axis of 4). The machine's other events
(resizing, recompiling, freezing, cloning, converting BatchNormalization,
changing ``micro_batch_size``) do not touch the distribution in a way the
events kept here do not: they are left to the single-device test, to keep the
budget.

The budget (``EXAMPLES``) is small and fixed, as the workers run on the
test session's background lane (target: under 60 CPU-s each). Measured on
the project's 2-core VM while shared: TensorFlow 12 examples, compiled or
eager as drawn, 30 CPU-s; JAX 12 examples, jitted, 44 CPU-s (run eagerly,
58-63: XLA compiles each eager operation again for each layout). The draw
is the single-device test's (the same examples every run unless
``ACCUM_KERAS_STATE_MACHINE_EXPLORE=1``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import tempfile
import time
import traceback

import keras
import numpy as np
import test_window_state_machine as machine
from hypothesis import HealthCheck, Phase, reporting, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule, run_state_machine_as_test

BACKEND = keras.backend.backend()

# Every batch splits evenly between the two replicas: on an uneven split
# plain Keras under the strategy weighs the replicas' means equally, which is
# not the single-device big batch, and so does the model wherever it runs
# Keras' own step (k = 1, the in-step mode). Accumulated windows (k >= 2)
# normalize globally, uneven shares too (tests/test_distributed.py's
# train_on_batch_then_fit case: micro-batches of 3 rows).
TF_MICRO = 4
# A JAX batch is laid out over the batch axis (8 devices of DataParallel, 4 of
# the ModelParallel mesh): its rows must divide over them.
JAX_MICRO = 8
JAX_MESH = (4, 2)  # ("batch", "model"): every layer width here (4, 6) divides over "model"
JAX_FIT_BATCH_SIZES = [16, 8, 24]
JAX_MICRO_BATCH_SIZES = [4, 8, 3, 16]

# The LayoutMap keys: "broad" matches many variables, "narrow" one variable path.
BROAD_KEYS = ((".*kernel", ("model", None)), (".*bn.*", ("model",)))
NARROW_KEYS = {
    "hidden/kernel": (".*hidden/kernel", (None, "model")),
    "bn/moving_mean": (".*bn/moving_mean", ("model",)),
}


@dataclasses.dataclass(frozen=True)
class DistributedConfiguration(machine.Configuration):
    """A configuration of the single-device machine, and the distribution it runs under."""

    distribution: str = "none"  # "mirrored", "data_parallel" or "model_parallel"
    layout: tuple = ()  # ModelParallel's LayoutMap entries: ((key, axes), ...)
    layout_kind: str | None = None  # "broad" or "narrow"
    run_eagerly: bool = False


def compile_model(model, config: DistributedConfiguration) -> None:
    """The machine's ``compile_model``, with the configuration's ``run_eagerly``.

    Compiled is the path users take. On JAX it is also the cheaper one: run
    eagerly, XLA compiles every operation anew for each layout (58-63 CPU-s
    for 12 examples, 44 compiled).
    """
    model.compile(machine.optimizer(config), loss="mse", run_eagerly=config.run_eagerly)


def use_micro_batch_rows(rows: int) -> None:
    """Sets the machine's micro-batch to ``rows`` rows (its data pool grows with it).

    The single-device machine reads ``MICRO`` and its data from module
    globals when it runs, so a worker process (which runs nothing else of it)
    can set them once before its first example.
    """
    rng = np.random.default_rng(0)
    size = machine.POOL * rows
    machine.MICRO = rows
    machine.X = rng.normal(loc=0.5, scale=2.0, size=(size, machine.FEATURES)).astype("float32")
    machine.Y = rng.normal(size=(size, 1)).astype("float32")
    tokens = rng.integers(0, machine.VOCABULARY, size=(size, 1)).astype("float32")
    machine.X_TOKENS = np.concatenate([machine.X, tokens], axis=1)
    machine.normalized_inputs.cache_clear()


@st.composite
def distributed_configurations(draw) -> DistributedConfiguration:
    in_step = draw(st.sampled_from(machine.MODES)) == "in_step"
    kinds = list(machine.IN_STEP_KINDS if in_step else machine.KINDS)
    if BACKEND == "tensorflow":
        # A user-written train_step under a tf.distribute strategy is refused
        # at its first step (docs/your-model.md), the one ending in
        # ``super().train_step`` too.
        kinds = [kind for kind in kinds if kind not in ("super_step", "own_gradients_step")]
    kind = draw(st.sampled_from(kinds))
    skip = draw(st.booleans())
    smallest_k = 2 if skip else 1
    steps = st.just(1) if in_step else st.integers(smallest_k, 4)
    batch_norm_kinds = [None, "plain", "accum"]
    if in_step and BACKEND == "tensorflow":
        # Each replica splits its own share of the batch (see the module's docstring).
        batch_norm_kinds = [None]
    batch_norm_kind = draw(st.sampled_from(batch_norm_kinds))
    batch_norm = None
    if batch_norm_kind is not None:
        arguments = dict(
            machine.batch_norm_arguments(draw, regularized=kind != "own_gradients_step")
        )
        if BACKEND == "tensorflow":
            # The statistics of the whole micro-batch, as the reference computes them.
            arguments["synchronized"] = True
        batch_norm = machine.BatchNorm(batch_norm_kind, tuple(sorted(arguments.items())))
    scaling = None
    if draw(st.booleans()):
        scaling = machine.Scaling(
            rule=draw(st.sampled_from(["linear", None])),
            warmup_updates=0,
            warmup_epochs=0.0,
            base_batch_size=None,
            schedule=None,
            verbose=0,
        )
    distribution, layout, layout_kind = "mirrored", (), None
    if BACKEND == "jax":
        distribution = draw(st.sampled_from(["model_parallel", "data_parallel"]))
        if distribution == "model_parallel":
            layout_kind = draw(st.sampled_from(["broad", "narrow"]))
            if layout_kind == "broad":
                layout = BROAD_KEYS
            else:
                narrow = ["hidden/kernel"] + (["bn/moving_mean"] if batch_norm else [])
                layout = (NARROW_KEYS[draw(st.sampled_from(narrow))],)
    if BACKEND == "jax":
        micro_batch_sizes, fit_batch_sizes = JAX_MICRO_BATCH_SIZES, JAX_FIT_BATCH_SIZES
    else:
        micro_batch_sizes, fit_batch_sizes = machine.MICRO_BATCH_SIZES, machine.FIT_BATCH_SIZES
    return DistributedConfiguration(
        kind=kind,
        batch_norm=batch_norm,
        skip_nonfinite=skip,
        poisoned=frozenset(draw(st.sets(st.integers(0, machine.POOL - 1), min_size=1, max_size=2)))
        if skip
        else frozenset(),
        accumulation_steps=draw(steps),
        accumulator_dtype="float32",
        policy="float32",
        embedding=False,
        loss_scaling=None,
        # Under MirroredStrategy each replica keeps its own float8 window
        # maximum and the first replica's is kept, as in plain Keras
        # (docs/how-it-works.md): not the global big batch's. The single-device
        # test draws float8.
        float8=False,
        scaling=scaling,
        rate_idiom=draw(st.sampled_from(["setter", "assign"])),
        smallest_k=smallest_k,
        micro_batch_size=draw(st.sampled_from(micro_batch_sizes)) if in_step else None,
        fit_batch_size=draw(st.sampled_from(fit_batch_sizes)) if in_step else machine.MICRO,
        distribution=distribution,
        layout=layout,
        layout_kind=layout_kind,
        # TensorFlow: compiled (tf.function, merge_call in a graph) or eager
        # (each replica a thread); JAX: jitted (see `compile_model`).
        run_eagerly=BACKEND == "tensorflow" and draw(st.booleans()),
    )


def jax_distribution(config: DistributedConfiguration):
    """The example's `keras.distribution` on the 8 host devices."""
    import jax

    if config.distribution == "none":
        return None
    if config.distribution == "data_parallel":
        return keras.distribution.DataParallel(devices=jax.devices())
    mesh = keras.distribution.DeviceMesh(JAX_MESH, ("batch", "model"), jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in config.layout:
        layout_map[key] = axes
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


class DistributedWindowLife(machine.WindowLife):
    """`WindowLife` with the models under test built under the example's distribution.

    ``new_strategy`` (TensorFlow) makes a fresh MirroredStrategy: one per
    example (see `tests/distributed/mirrored_worker.py`'s ``new_strategy``).
    """

    new_strategy = None
    drawn: list = []  # a summary of each example's configuration (set by `run`)

    def __init__(self):
        super().__init__()
        self.strategy = None

    def _model_scope(self):
        if self.strategy is None:
            return contextlib.nullcontext()
        return self.strategy.scope()

    @initialize(config=distributed_configurations())
    def configure(self, config: DistributedConfiguration):
        self.drawn.append(
            {
                "kind": config.kind,
                "batch_norm": config.batch_norm and config.batch_norm.kind,
                "skip_nonfinite_updates": config.skip_nonfinite,
                "mode": "streaming" if config.micro_batch_size is None else "in_step",
                "distribution": config.distribution,
                "layout": config.layout_kind,
                "run_eagerly": config.run_eagerly,
            }
        )
        print(f"  configuration: {self.drawn[-1]}", file=sys.stderr, flush=True)
        if BACKEND == "jax":
            # Models, reference and events alike (see the module's docstring).
            keras.distribution.set_distribution(jax_distribution(config))
            machine.WindowLife.configure(self, config)
            # Copies: the model's compiled steps donate their arrays, which
            # the reference received by `assign`.
            for reference, variable in zip(
                machine.trained_weights(self.plain), machine.trained_weights(self.model)
            ):
                reference.assign(keras.ops.convert_to_numpy(variable))
            return
        # The reference is built on one device, the model in the strategy's scope.
        machine.WindowLife.configure(self, config)
        if config.distribution != "mirrored":
            return
        self.strategy = type(self).new_strategy()
        with self._model_scope():
            keras.utils.set_random_seed(1)
            model = machine.new_model(config, self.batch_norm, self.k)
        assert model.distribute_strategy.num_replicas_in_sync == 2
        model.set_weights(self.model.get_weights())
        self.model = model

    def teardown(self):
        if BACKEND == "jax":
            keras.distribution.set_distribution(None)
        super().teardown()

    @rule()
    def save_and_load_into_a_fresh_model(self):
        with self._model_scope():
            machine.WindowLife.save_and_load_into_a_fresh_model(self)

    # Left to the single-device test (see the module's docstring).
    resize = recompile = toggle_freeze_and_recompile = None
    change_micro_batch_size = clone = convert_batch_normalization = None


# The budget (``max_examples``), per backend; see the module's docstring.
EXAMPLES = {"tensorflow": 12, "jax": 12}
EXAMPLES_ENV = "ACCUM_KERAS_DISTRIBUTED_STATE_MACHINE_EXAMPLES"


def run(examples: int | None = None, steps: int = 8, new_strategy=None) -> dict:
    """Runs the machine under the distribution for ``examples`` examples.

    Args:
        examples: hypothesis' ``max_examples`` (default: ``EXAMPLES`` of the
            backend, or the environment's ``EXAMPLES_ENV``).
        steps: events per example at most (``stateful_step_count``).
        new_strategy: TensorFlow: a function returning a fresh MirroredStrategy.

    Returns:
        ``{"examples": run, "budget": examples, "seconds": wall,
        "cpu_seconds": this process's CPU time, "failure": None or the failing
        example (its configuration and events, as hypothesis reports them,
        unshrunk) with the error, "drawn": a summary of each example's
        configuration}``; a line per example goes to stderr.
    """
    if examples is None:
        examples = int(os.environ.get(EXAMPLES_ENV, EXAMPLES[BACKEND]))
    use_micro_batch_rows(JAX_MICRO if BACKEND == "jax" else TF_MICRO)
    # Read by the machine when it runs, as ``MICRO`` (see `use_micro_batch_rows`).
    machine.compile_model = compile_model
    directory = tempfile.mkdtemp(prefix="accum_keras_distributed_machine_")
    count = 0
    started, cpu_started = time.monotonic(), time.process_time()

    class Counting(DistributedWindowLife):
        def __init__(self):
            nonlocal count
            count += 1
            print(f"distributed state machine: example {count}", file=sys.stderr, flush=True)
            super().__init__()

    Counting.directory = directory
    Counting.drawn = drawn = []
    Counting.new_strategy = staticmethod(new_strategy) if new_strategy else None
    report = io.StringIO()
    failure = None
    with reporting.with_reporter(lambda text: print(text, file=report)):
        try:
            run_state_machine_as_test(
                Counting,
                settings=settings(
                    max_examples=examples,
                    stateful_step_count=steps,
                    deadline=None,
                    database=None,
                    derandomize=machine._DERANDOMIZE,
                    suppress_health_check=list(HealthCheck),
                    # A failure is reported as found: shrinking it under a
                    # distribution could take minutes of the CI budget.
                    phases=[Phase.explicit, Phase.generate],
                ),
            )
        except BaseException as error:  # noqa: BLE001 (reported to the test in the JSON)
            if isinstance(error, KeyboardInterrupt):
                raise
            failure = (
                report.getvalue()
                + "".join(traceback.format_exception(type(error), error, error.__traceback__))[
                    -6000:
                ]
            )
    return {
        "examples": count,
        "budget": examples,
        "seconds": round(time.monotonic() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "failure": failure,
        "drawn": drawn,
    }
