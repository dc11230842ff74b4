"""Hand-listed one-line mutants of accum_keras, and how many a test subset kills.

Each mutant replaces one exact snippet of one module (it must occur exactly
once) by a plausible mistake: a negated or loosened condition, a dropped
reset, a warmup shifted by one, a dropped option. For each mutant the file is
edited in place, the chosen tests run (TensorFlow by default) in a
subprocess with a timeout, and the file is restored in a ``finally`` whatever
happens. A mutant is *killed* when the tests fail (or time out), *survives*
when they pass.

Usage (from the repository root, with the project's environment)::

    nice -n 10 python tools/mutation_score.py
    python tools/mutation_score.py --only apply --examples 10 --timeout 300
    python tools/mutation_score.py --list

Runs mutants one after another, to stay frugal on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The state machine first: with ``-x`` most mutants stop there, early.
DEFAULT_TESTS = (
    "tests/test_window_state_machine.py",
    "tests/test_composition_apply.py",
    "tests/test_composition_config.py",
)


@dataclasses.dataclass(frozen=True)
class Mutant:
    path: str
    original: str
    replacement: str
    what: str

    @property
    def name(self) -> str:
        return f"{pathlib.Path(self.path).stem.lstrip('_')}: {self.what}"


MUTANTS = (
    # -- _apply.py: the one function that ends a window
    Mutant(
        "accum_keras/_apply.py",
        'state.skipped_updates.assign_add(ops.cast(ops.logical_not(finite), "int32"))',
        'state.skipped_updates.assign_add(ops.cast(ops.logical_not(finite), "int32") * 0)',
        "a skipped window is not counted",
    ),
    Mutant(
        "accum_keras/_apply.py",
        "if model.skip_nonfinite_updates and not loss_scaled:",
        "if False:",
        "skip_nonfinite_updates never skips",
    ),
    Mutant(
        "accum_keras/_apply.py",
        "layer.apply_window_statistics(applied=finite)",
        "layer.apply_window_statistics(applied=None)",
        "a skipped window's BatchNorm statistics are applied",
    ),
    Mutant(
        "accum_keras/_apply.py",
        "state.last_update_samples.assign(state.window_samples.value)",
        "pass",
        "last_update_samples not set",
    ),
    Mutant(
        "accum_keras/_apply.py",
        "for variable in (state.window_samples, state.window_divisor, state.micro_step):",
        "for variable in (state.window_divisor, state.micro_step):",
        "window_samples not reset",
    ),
    # -- _batch_norm.py
    Mutant(
        "accum_keras/_batch_norm.py",
        "update = ops.logical_and(update, applied)",
        "update = update",
        "moving statistics ignore `applied`",
    ),
    Mutant(
        "accum_keras/_batch_norm.py",
        "update = window.count.value > 0",
        "update = window.count.value >= 0",
        "an empty window decays the moving statistics",
    ),
    Mutant(
        "accum_keras/_batch_norm.py",
        "new_variance = self.moving_variance * momentum + window.variance() * (1.0 - momentum)",
        "new_variance = self.moving_variance * momentum"
        " + ops.divide_no_nan(window.m2.value, window.count.value - 1.0) * (1.0 - momentum)",
        "unbiased pooled variance",
    ),
    Mutant(
        "accum_keras/_batch_norm.py",
        "            self._window.reset()",
        "            pass",
        "discard_window_statistics does not reset",
    ),
    Mutant(
        "accum_keras/_batch_norm.py",
        "if type(layer) is keras.layers.BatchNormalization:",
        "if False:",
        "convert_batch_normalization converts nothing",
    ),
    # -- _lifecycle.py
    Mutant(
        "accum_keras/_lifecycle.py",
        "        _reset_window(model)\n    _reset_layer_statistics(model)",
        "        _reset_window(model)",
        "discard keeps the pooled BatchNorm statistics",
    ),
    Mutant(
        "accum_keras/_lifecycle.py",
        "if pending_micro_steps(model) >= model.accumulation_steps:",
        "if pending_micro_steps(model) > model.accumulation_steps:",
        "settle leaves a full window open",
    ),
    Mutant(
        "accum_keras/_lifecycle.py",
        "        state.window_samples,\n    ):",
        "    ):",
        "discard keeps window_samples",
    ),
    # -- _custom_step.py
    Mutant(
        "accum_keras/_custom_step.py",
        "    state.add_samples_seen(samples)\n    state.micro_step.assign_add(1)",
        "    state.micro_step.assign_add(1)",
        "a custom step's samples are not counted as seen",
    ),
    Mutant(
        "accum_keras/_custom_step.py",
        "ops.greater_equal(state.micro_step.value, state.accumulation_steps.value)",
        "ops.greater(state.micro_step.value, state.accumulation_steps.value)",
        "a custom step's window closes one micro-batch late",
    ),
    Mutant(
        "accum_keras/_custom_step.py",
        "and model.accumulation_steps > 1\n        and not getattr",
        "and model.accumulation_steps > 2\n        and not getattr",
        "is_active wrong at k = 2",
    ),
    # -- _model.py
    Mutant(
        "accum_keras/_model.py",
        "if self._accumulation_fitting and not self._accumulation_evaluating:",
        "if self._accumulation_fitting:",
        "evaluate() from a callback applies the open window",
    ),
    Mutant(
        "accum_keras/_model.py",
        "if (previous == 1) != (value == 1) and self.train_function is not None:",
        "if value == 1 and self.train_function is not None:",
        "k 1 -> 4 keeps Keras' plain train function",
    ),
    Mutant(
        "accum_keras/_model.py",
        "            _lifecycle.discard_pending(self)\n        else:",
        "            pass\n        else:",
        "BackupAndRestore's restored window is kept",
    ),
    Mutant(
        "accum_keras/_model.py",
        "layer.defer_to_window = self._accumulation_steps > 1",
        "layer.defer_to_window = True",
        "AccumBatchNormalization defers at k = 1",
    ),
    # -- _callback.py
    Mutant(
        "accum_keras/_callback.py",
        "            return self.model.accumulation_steps\n        return schedule[max(started)]",
        "            return 1\n        return schedule[max(started)]",
        "a schedule without epoch 0 starts at k = 1",
    ),
    Mutant(
        "accum_keras/_callback.py",
        "if logs is not None and self._updates() > self._fit_start_updates:",
        "if logs is not None and self._updates() >= self._fit_start_updates:",
        "effective_batch_size logged before the fit's first update",
    ),
    Mutant(
        "accum_keras/_callback.py",
        "self._log_skips = model.skip_nonfinite_updates or isinstance(",
        "self._log_skips = isinstance(",
        "skipped_updates not logged with skip_nonfinite_updates",
    ),
    Mutant(
        "accum_keras/_callback.py",
        "return max(1, round(self.warmup_epochs * math.ceil(steps / k)))",
        "return max(1, round(self.warmup_epochs * math.floor(steps / k)))",
        "warmup_epochs ignores the short last window",
    ),
    Mutant(
        "accum_keras/_callback.py",
        "self._micro_batch_size = max(1, round(seen / (batch + 1)))",
        "self._micro_batch_size = max(1, round(seen / (batch + 2)))",
        "micro-batch size measured wrong",
    ),
    # -- _schedules.py
    Mutant(
        "accum_keras/_schedules.py",
        'progress = ops.minimum(ops.cast(step, "float32") / float(warmup_updates), 1.0)',
        'progress = ops.minimum(ops.cast(step + 1, "float32") / float(warmup_updates), 1.0)',
        "warmup shifted by one update",
    ),
    Mutant(
        "accum_keras/_schedules.py",
        "            factor = ops.sqrt(factor)",
        "            factor = factor",
        "sqrt scaling is linear",
    ),
    Mutant(
        "accum_keras/_schedules.py",
        "self.base.assign(float(ops.convert_to_numpy(value)) / multiplier)",
        "self.base.assign(float(ops.convert_to_numpy(value)))",
        "a rate set during the fit is not rescaled",
    ),
    # -- _accumulate.py
    Mutant(
        "accum_keras/_accumulate.py",
        "    copy_model_options(model, clone)\n    return clone",
        "    return clone",
        "clone_model drops the model options",
    ),
    Mutant(
        "accum_keras/_accumulate.py",
        "        run_eagerly=model.run_eagerly,\n",
        "",
        "accumulate() drops run_eagerly",
    ),
    # -- _state.py
    Mutant(
        "accum_keras/_state.py",
        '            "skipped_updates",\n        ):\n            if name in saved:',
        "        ):\n            if name in saved:",
        "skipped_updates not restored by a load",
    ),
    Mutant(
        "accum_keras/_state.py",
        "matches = len(saved_gradients) == len(self.gradients) and all(",
        "matches = len(saved_gradients) >= len(self.gradients) and all(",
        "a window restored into a prefix of its variables",
    ),
)


def run_tests(tests: list[str], examples: int, timeout: float) -> tuple[bool, float]:
    """Whether the tests pass (False on a timeout), and how long they ran."""
    env = {
        **os.environ,
        "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "ACCUM_KERAS_STATE_MACHINE_EXAMPLES": str(examples),
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, timeout=timeout, capture_output=True, check=False
        )
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - start
    return result.returncode == 0, time.monotonic() - start


def mutate(mutant: Mutant) -> str:
    """Applies ``mutant`` in place; returns the original text of the file."""
    path = ROOT / mutant.path
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise ValueError(f"{mutant.name}: the snippet occurs {count} times in {mutant.path}")
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS))
    parser.add_argument("--examples", type=int, default=10, help="state-machine examples")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per mutant")
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for mutant in mutants:
            print(mutant.name)
        return 0
    # Every snippet must exist before anything is edited.
    for mutant in mutants:
        count = (ROOT / mutant.path).read_text().count(mutant.original)
        if count != 1:
            raise SystemExit(f"{mutant.name}: the snippet occurs {count} times")
    passed, seconds = run_tests(args.tests, args.examples, args.timeout)
    if not passed:
        raise SystemExit(f"the tests fail without a mutant ({seconds:.0f} s): fix them first")
    print(f"unmutated: pass in {seconds:.0f} s", flush=True)
    killed = 0
    for number, mutant in enumerate(mutants, 1):
        original = mutate(mutant)
        try:
            passed, seconds = run_tests(args.tests, args.examples, args.timeout)
        finally:
            (ROOT / mutant.path).write_text(original)
        killed += not passed
        verdict = "survived" if passed else "killed"
        print(f"{number:2d}. {verdict:8s} {seconds:5.0f} s  {mutant.name}", flush=True)
    print(f"kill rate: {killed}/{len(mutants)} = {killed / len(mutants):.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
