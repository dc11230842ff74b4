"""The model options, each declared once: its name, default and check.

A model option says how an `AccumulatingModel` trains. Everything that makes,
copies or describes such a model reads `MODEL_OPTIONS`: the constructor (the
defaults and the checks), ``get_config``/``from_config`` (what is saved),
`accum_keras.clone_model` and `convert_batch_normalization` (what a copy
keeps), `accum_keras.accumulate` (what it accepts) and the tests (what the
randomized configuration test draws). A new option added here reaches all of
them; one added anywhere else reaches none.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from accum_keras._config import (
    check_accumulation_steps,
    check_accumulator_dtype,
    check_micro_batch_size,
    check_modes_compose,
    check_skip_nonfinite_updates,
)


@dataclasses.dataclass(frozen=True)
class ModelOption:
    """One option of an accumulating model.

    Attributes:
        name: the keyword argument, the model attribute and the config key.
        default: the value of a model built without it (not saved in configs).
        check: returns the value to store, or raises a `TypeError` or
            `ValueError` that names the argument and what is allowed.
        summary: what it is, for messages that list the options.
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    summary: str


MODEL_OPTIONS: tuple[ModelOption, ...] = (
    ModelOption(
        "accumulation_steps",
        1,
        check_accumulation_steps,
        "micro-batches per optimizer update (int >= 1)",
    ),
    ModelOption(
        "skip_nonfinite_updates",
        False,
        check_skip_nonfinite_updates,
        "leave out a window whose gradient is not finite (bool)",
    ),
    ModelOption(
        "accumulator_dtype",
        "float32",
        check_accumulator_dtype,
        "the dtype the gradients are summed in",
    ),
    ModelOption(
        "micro_batch_size",
        None,
        check_micro_batch_size,
        "split each fit() batch into micro-batches of at most this size inside "
        "the train step (None or int >= 1)",
    ),
)

OPTION_NAMES: tuple[str, ...] = tuple(option.name for option in MODEL_OPTIONS)


def defaults() -> dict[str, Any]:
    """Every option's default value, by name."""
    return {option.name: option.default for option in MODEL_OPTIONS}


def checked(values: Mapping[str, Any]) -> dict[str, Any]:
    """Checks the given options and fills in the defaults of the others.

    Args:
        values: options by name (all of them or some).

    Returns:
        Every option by name, each value as its check returns it.

    Raises:
        TypeError: for a name that is no option (naming the closest), or
            from an option's check.
        ValueError: from an option's check, or for options that do not
            compose (`check_modes_compose`).
    """
    refuse_unknown(values, where="model option")
    result = {
        option.name: option.check(values.get(option.name, option.default))
        for option in MODEL_OPTIONS
    }
    # The one rule between options: the two modes do not compose.
    check_modes_compose(result["accumulation_steps"], result["micro_batch_size"])
    return result


def split(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separates the model options from the other keyword arguments.

    Returns:
        ``(options, others)``: every option (checked, defaults filled in) and
        the keyword arguments that are not options, for the Keras model.
    """
    options = {name: value for name, value in kwargs.items() if name in OPTION_NAMES}
    others = {name: value for name, value in kwargs.items() if name not in OPTION_NAMES}
    return checked(options), others


def non_default(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that differ from their defaults (what a config records).

    ``accumulation_steps`` is always recorded: it is the option a reader of a
    saved config looks for.
    """
    return {
        option.name: options[option.name]
        for option in MODEL_OPTIONS
        if option.name == "accumulation_steps" or options[option.name] != option.default
    }


def closest(name: str, candidates: Iterable[str] = OPTION_NAMES) -> str | None:
    """The candidate ``name`` was most likely meant to be, if any is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def refuse_unknown(values: Mapping[str, Any], where: str, allowed: Iterable[str] = ()) -> None:
    """Raises a `TypeError` for a keyword argument that is neither an option nor allowed.

    Args:
        values: keyword arguments by name.
        where: what received them, for the message (e.g. ``"accumulate()"``).
        allowed: other names the receiver accepts.
    """
    allowed = tuple(allowed)
    unknown = [name for name in values if name not in OPTION_NAMES and name not in allowed]
    if not unknown:
        return
    name = unknown[0]
    guess = closest(name, OPTION_NAMES + allowed)
    hint = f" Did you mean `{guess}`?" if guess else ""
    listed = ", ".join(f"`{option.name}` ({option.summary})" for option in MODEL_OPTIONS)
    raise TypeError(
        f"{where} got an unexpected keyword argument `{name}`.{hint} The model options are "
        f"{listed}. Received: {name}={values[name]!r}."
    )
