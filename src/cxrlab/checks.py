"""Value checks shared by the option validators (``validate``) and the fine-tuning options: a whole
number, a finite number, a choice, each failing with one ``DataError`` that names the option."""

from __future__ import annotations

import math
import numbers

from .errors import DataError


def option_message(name: str, problem: str) -> str:
    return f"{name} {problem}" if name else problem


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, special: tuple = (),
              special_text: str = "") -> int:
    """``value`` as an int in [lo, hi] (or one of ``special``, e.g. -1 for 'all'); DataError otherwise."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise DataError(option_message(name, f"must be a whole number{_range_text(lo, hi, special_text)}, "
                                         f"got {value!r}")) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(option_message(name, f"must be a whole number{_range_text(lo, hi, special_text)}, got {value!r}"))
    value = int(value)
    if value in special:
        return value
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise DataError(option_message(name, f"must be a whole number{_range_text(lo, hi, special_text)}, got {value}"))
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float within the bounds (open or closed); DataError otherwise."""
    bounds = _bounds_text(lo, hi, lo_open, hi_open)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise DataError(option_message(name, f"must be a number{bounds}, got {value!r}")) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(option_message(name, f"must be a number{bounds}, got {value!r}"))
    value = float(value)
    if not math.isfinite(value):
        raise DataError(option_message(name, f"must be a finite number{bounds}, got {value}"))
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise DataError(option_message(name, f"must be a number{bounds}, got {value:g}"))
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise DataError(option_message(name, f"must be a number{bounds}, got {value:g}"))
    return value


def _range_text(lo, hi, special_text: str) -> str:
    if lo is not None and hi is not None:
        text = f" from {lo} to {hi}"
    elif lo is not None:
        text = f" >= {lo}"
    elif hi is not None:
        text = f" <= {hi}"
    else:
        text = ""
    return text + (f" ({special_text})" if special_text else "")


def _bounds_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi:g}"
    return ""


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise DataError(option_message(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}"))
    return value


