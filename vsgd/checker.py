"""The checker the rules of `vsgd.spec` (and `pipeline.params_check`) are written with: it
walks a value, collects every problem with its key path and what is allowed, and never stops
at the first; intervals of allowed numbers (`Range`); the int64 range every integer a run
hands to torch and numpy must fit. No torch, nothing outside the standard library."""

import difflib
import math


class Range:
    """An allowed interval of numbers; `str` gives it in interval notation."""

    def __init__(self, low=None, high=None, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __contains__(self, value):
        return not (
            (self.low is not None and (value <= self.low if self.low_open else value < self.low))
            or (
                self.high is not None
                and (value >= self.high if self.high_open else value > self.high)
            )
        )

    def __str__(self):
        return (
            ("(" if self.low_open or self.low is None else "[")
            + ("-inf" if self.low is None else _bound(self.low))
            + ", "
            + ("inf" if self.high is None else _bound(self.high))
            + (")" if self.high_open or self.high is None else "]")
        )


def _bound(number) -> str:
    """An interval's end as written: integers exactly (a seed's bound), floats short."""
    return str(number) if isinstance(number, int) else f"{number:g}"


# Integers a run hands to torch and numpy (sizes, counts, step numbers) are int64 there: a
# larger one is an OverflowError in the middle of a run, so every integer check bounds them.
INT64 = (-(2**63), 2**63 - 1)


ANY_NUMBER = Range()  # every finite number


class _Missing:
    """A required key that is absent (already reported): checks on it pass silently."""

    def __repr__(self):
        return "<missing>"


MISSING = _Missing()


class View:
    """A mapping under validation: absent keys read as MISSING, writes (coerced numbers)
    go to the underlying dict."""

    def __init__(self, data: dict):
        self.data = data

    def __getitem__(self, key):
        return self.data.get(key, MISSING)

    def __setitem__(self, key, value):
        self.data[key] = value

    def __contains__(self, key):
        return key in self.data

    def __iter__(self):
        return iter(list(self.data))


class Checker:
    """Accumulates problems, each with its key path; each check returns whether the value
    passed. Numbers that YAML spelled another way (3.0e4, "1e-8") are coerced in place."""

    def __init__(self):
        self.problems = []

    def problem(self, text):
        self.problems.append(text)
        return False

    def mapping(self, value, path, required=(), optional=()):
        """A view of `value` if it is a mapping (unknown and missing keys reported)."""
        if value is MISSING:
            return None
        if isinstance(value, View):
            value = value.data
        if not isinstance(value, dict):
            self.problem(f"{path or 'params.yaml'}: expected a mapping, got {kind(value)}")
            return None
        allowed = list(dict.fromkeys(list(required) + list(optional)))
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(f"{join(path, key)}: unknown key{hint}; allowed: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.problem(f"{join(path, key)}: missing")
        return View(value)

    def names(self, value, path, allowed):
        """A non-empty list of distinct names from `allowed`."""
        if not self.list_of(value, path):
            return False
        ok = True
        for i, name in enumerate(value):
            ok &= self.choice(name, f"{path}[{i}]", allowed)
        if len(set(map(str, value))) != len(value):
            ok = self.problem(f"{path}: duplicates in {value!r}")
        return ok

    def list_of(self, value, path, empty_ok=False):
        if value is MISSING:
            return False
        if not isinstance(value, list):
            return self.problem(f"{path}: expected a list, got {kind(value)}")
        if not value and not empty_ok:
            return self.problem(f"{path}: must not be empty")
        return True

    def choice(self, value, path, allowed):
        if value is MISSING:
            return False
        if any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            return True
        shown = ", ".join(show(a) for a in allowed)
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return self.problem(f"{path}: {show(value)} is not allowed{hint}; allowed: {shown}")

    def string(self, value, path):
        if value is MISSING or (isinstance(value, str) and value):
            return value is not MISSING
        return self.problem(f"{path}: expected a non-empty string, got {value!r}")

    def integer(self, parent, key, path, minimum=INT64[0], maximum=INT64[1]):
        """An integer in [minimum, maximum]; never a bool (true is not 1), and never beyond
        int64 (`INT64`), whatever the bounds asked for."""
        value = parent[key]
        if value is MISSING:
            return False
        if isinstance(value, float) and value.is_integer():
            value = parent[key] = int(value)  # 3.0e4 from YAML is meant as 30000
        if isinstance(value, bool) or not isinstance(value, int):
            return self.problem(f"{path}: expected an integer, got {value!r}")
        if value < max(minimum, INT64[0]):
            return self.problem(f"{path}: {number_text(value)} must be >= {max(minimum, INT64[0])}")
        if value > min(maximum, INT64[1]):
            return self.problem(f"{path}: {number_text(value)} must be <= {min(maximum, INT64[1])}")
        return True

    def number(self, parent, key, path, allowed: Range = ANY_NUMBER):
        """A finite number (NaN and infinities never are a setting) within `allowed`; never
        a bool. A string spelling a number is coerced in place."""
        value = parent[key]
        if value is MISSING:
            return False
        if isinstance(value, str):
            # YAML 1.1 reads 1e-8 (no dot) as a string; accept the number it spells.
            try:
                value = parent[key] = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self.problem(f"{path}: expected a number, got {value!r}")
        if not is_finite(value):
            return self.problem(
                f"{path}: {number_text(value)} is not a finite number; allowed: {allowed}"
            )
        if value not in allowed:
            return self.problem(f"{path}: {value!r} is outside {allowed}")
        return True


def is_finite(number) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int beyond any float
        return False


def number_text(number) -> str:
    """A number for a problem line: an integer too long to read (or to print at all past
    Python's 4300 digits) by its size."""
    if isinstance(number, int) and abs(number) >= 10**30:
        return f"an integer of {number.bit_length()} bits"
    return repr(number)


def kind(value) -> str:
    return "null" if value is None else type(value).__name__


def show(value) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def join(path, key) -> str:
    return f"{path}.{key}" if path else str(key)
