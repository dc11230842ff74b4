"""Validation of user-facing settings, shared by the model and the callback."""

from __future__ import annotations

import numbers
from typing import Any

# The window counters are int32 on every backend.
MAX_ACCUMULATION_STEPS = 2**31 - 1

# What an accumulator can be held in: a fixed float type, or "variable" for
# the dtype of the variable it accumulates (bfloat16 for a model held in
# bfloat16, float32 under the mixed policies, whose variables are float32).
ACCUMULATOR_DTYPES = ("float32", "bfloat16", "float16", "variable")


def check_accumulation_steps(value: Any, name: str = "accumulation_steps") -> int:
    """Returns ``value`` as an int if it is an integer in [1, 2**31 - 1], else raises.

    Args:
        value: the candidate number of micro-batches per update.
        name: the argument name used in the error message.

    Returns:
        ``int(value)``.

    Raises:
        TypeError: for bools, floats and other non-integers.
        ValueError: for integers below 1 or above `MAX_ACCUMULATION_STEPS`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an int >= 1 (the number of micro-batches per "
            f"optimizer update). Received: {name}={value!r} of type "
            f"{type(value).__name__}."
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be an int >= 1 (the number of micro-batches per "
            f"optimizer update). Received: {name}={value!r}."
        )
    if value > MAX_ACCUMULATION_STEPS:
        raise ValueError(
            f"`{name}` must be at most {MAX_ACCUMULATION_STEPS} (2**31 - 1: the "
            f"window counts its micro-batches in int32). Received: {name}={value!r}."
        )
    return int(value)


def check_micro_batch_size(value: Any, name: str = "micro_batch_size") -> int | None:
    """Returns ``value`` as an int if it is None or an integer in [1, 2**31 - 1], else raises.

    Args:
        value: the candidate number of samples per micro-batch of a train
            step (None: the in-step mode is off).
        name: the argument name used in the error message.

    Returns:
        None or ``int(value)``.

    Raises:
        TypeError: for bools, floats and other non-integers.
        ValueError: for integers below 1 or above `MAX_ACCUMULATION_STEPS`.
    """
    if value is None:
        return None
    allowed = (
        f"`{name}` must be None (off) or an int >= 1 (the most samples each "
        "train step runs forward and backward at once)"
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{allowed}. Received: {name}={value!r} of type {type(value).__name__}.")
    if not 1 <= value <= MAX_ACCUMULATION_STEPS:
        raise ValueError(
            f"{allowed}, at most {MAX_ACCUMULATION_STEPS}. Received: {name}={value!r}."
        )
    return int(value)


def check_modes_compose(accumulation_steps: int, micro_batch_size: int | None) -> None:
    """Refuses ``micro_batch_size`` together with ``accumulation_steps > 1``.

    Args:
        accumulation_steps: the streaming mode's micro-batches per update.
        micro_batch_size: the in-step mode's micro-batch size, or None.

    Raises:
        ValueError: when both modes are asked for.
    """
    if micro_batch_size is None or accumulation_steps == 1:
        return
    raise ValueError(
        "`micro_batch_size` (split each fit() batch inside its train step and apply one "
        "update per step) cannot be combined with `accumulation_steps > 1` (one update "
        "per window of several fit() steps): a window spanning several split steps would "
        "count fit() steps, samples and epoch ends in two ways at once. Use one mode: "
        "feed the big batch to fit() with micro_batch_size, or feed micro-batches with "
        f"accumulation_steps. Received: accumulation_steps={accumulation_steps!r}, "
        f"micro_batch_size={micro_batch_size!r}."
    )


def check_accumulator_dtype(value: Any, name: str = "accumulator_dtype") -> str:
    """Returns ``value`` if it is one of `ACCUMULATOR_DTYPES`, else raises.

    Args:
        value: the candidate dtype of the accumulators.
        name: the argument name used in the error message.

    Returns:
        ``value``, a str.

    Raises:
        ValueError: for anything else (dtype objects and other spellings
            included: the four names are the whole choice).
    """
    if isinstance(value, str) and value in ACCUMULATOR_DTYPES:
        return value
    allowed = ", ".join(repr(d) for d in ACCUMULATOR_DTYPES)
    raise ValueError(
        f"`{name}` must be one of {allowed} (the dtype the gradients are summed "
        "in; 'variable' follows each variable's own dtype). "
        f"Received: {name}={value!r}."
    )


def check_skip_nonfinite_updates(value: Any, name: str = "skip_nonfinite_updates") -> bool:
    """Returns ``value`` if it is True or False, else raises.

    Args:
        value: the candidate setting.
        name: the argument name used in the error message.

    Returns:
        ``value``, a bool.

    Raises:
        TypeError: for anything but a bool (``1`` and ``"yes"`` included).
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False. Received: {name}={value!r}.")
    return value


def check_optimizer_does_not_accumulate(optimizer: Any) -> None:
    """Rejects an optimizer that accumulates gradients itself.

    Keras' built-in ``gradient_accumulation_steps`` on top of the model's
    window would accumulate twice (k * k' micro-batches per update, with the
    built-in's per-micro-batch averaging).

    Args:
        optimizer: what ``compile()`` was given: an optimizer, a
            `LossScaleOptimizer`, a serialized optimizer (dict) or a name.
    """
    for candidate in _optimizer_and_inner(optimizer):
        if isinstance(candidate, dict):
            steps = candidate.get("config", {}).get("gradient_accumulation_steps")
        else:
            steps = getattr(candidate, "gradient_accumulation_steps", None)
        if steps:
            raise ValueError(
                "The optimizer passed to `compile()` already accumulates "
                f"gradients (gradient_accumulation_steps={steps}). An "
                "AccumulatingModel accumulates itself: create the optimizer "
                "without `gradient_accumulation_steps` and set the model's "
                "`accumulation_steps` instead."
            )


def _optimizer_and_inner(optimizer: Any) -> list[Any]:
    if isinstance(optimizer, dict):
        inner = optimizer.get("config", {}).get("inner_optimizer")
        return [optimizer] + ([inner] if isinstance(inner, dict) else [])
    return [optimizer, getattr(optimizer, "inner_optimizer", optimizer)]
