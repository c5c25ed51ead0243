"""Built-in functions the OPA-wasm host provides.

`opa build -t wasm` compiles most built-ins into the module; the rest (`sprintf` above all) are
listed by the module's `builtins()` export and called through the `opa_builtin0..4` imports. Each
implementation takes and returns plain JSON values (sets arrive as lists, as `opa_json_dump` writes
them) and returns `UNDEFINED` to leave the calling expression undefined.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Final

log = logging.getLogger(__name__)


class _Undefined:
    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED: Final = _Undefined()

HostBuiltin = Callable[..., Any]


# --- sprintf: Go's fmt.Sprintf over OPA's argument conversion ----------------------------------------

_VERB = re.compile(r"%([-+# 0]*)(\d+)?(?:\.(\d*))?([a-zA-Z%])")


def sprintf(format: str, values: list[Any]) -> str:
    """OPA's `sprintf`: numbers become Go ints or float64s, strings stay strings, and every other
    value is passed as its Rego text (so `%v` of [1, "a"] is `[1, "a"]`), then Go's fmt rules apply,
    including its `%!d(string=x)` reports for verbs that do not fit the value."""
    if not isinstance(format, str):
        raise TypeError("sprintf: operand 1 must be a string")
    if not isinstance(values, list):
        raise TypeError("sprintf: operand 2 must be an array")
    args = [_go_value(value) for value in values]
    out: list[str] = []
    position = 0
    used = 0
    for match in _VERB.finditer(format):
        out.append(format[position : match.start()])
        position = match.end()
        flags, width, precision, verb = match.groups()
        if verb == "%":
            out.append("%")
            continue
        if used >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        text = _format_one(verb, args[used], flags, None if precision is None else int(precision or 0))
        used += 1
        out.append(_pad(text, flags, int(width) if width else 0, numeric=not isinstance(args[used - 1], str)))
    out.append(format[position:])
    if used < len(args):
        out.append(
            "%!(EXTRA " + ", ".join(f"{_go_type(arg)}={_format_one('v', arg, '', None)}" for arg in args[used:]) + ")"
        )
    return "".join(out)


def _go_value(value: Any) -> int | float | str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return rego_text(value)
    if isinstance(value, int | float | str):
        return value
    return rego_text(value)


def rego_text(value: Any) -> str:
    """A value as Rego prints it: JSON with ", " and ": " separators."""
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


def _go_type(arg: int | float | str) -> str:
    return "string" if isinstance(arg, str) else "int" if isinstance(arg, int) else "float64"


def _bad_verb(verb: str, arg: int | float | str) -> str:
    return f"%!{verb}({_go_type(arg)}={_format_one('v', arg, '', None)})"


def _format_one(verb: str, arg: int | float | str, flags: str, precision: int | None) -> str:
    sign = "+" if "+" in flags else " " if " " in flags else ""
    if isinstance(arg, str):
        if verb in "sv":
            return arg if precision is None else arg[:precision]
        if verb == "q":
            return json.dumps(arg, ensure_ascii=False)
        if verb in "xX":
            hexed = arg.encode().hex()
            return hexed.upper() if verb == "X" else hexed
        return _bad_verb(verb, arg)
    if isinstance(arg, int):
        if verb in "dv":
            return f"{arg:{sign}d}"
        if verb in "xXob":
            return f"{arg:{sign}{'#' if '#' in flags else ''}{verb}}"
        if verb == "c":
            return chr(arg)
        return _bad_verb(verb, arg)
    if verb in "vgG" and precision is None:
        text = _go_shortest(arg)
        text = text.upper() if verb == "G" else text
        return sign + text if sign and arg >= 0 else text
    if verb in "eEfFgG":
        return f"{arg:{sign}.{6 if precision is None else precision}{verb}}"
    return _bad_verb(verb, arg)


def _go_shortest(number: float) -> str:
    """Go's %v of a float64 (strconv's shortest 'g'): the fewest digits that round-trip, in exponent
    form when the decimal exponent is below -4 or at least 6 (1e+06, 1.5e-05, 12.5, 100000)."""
    if number == 0:
        return "0"
    sign, digit_tuple, exponent = Decimal(repr(number)).normalize().as_tuple()
    digits = "".join(str(digit) for digit in digit_tuple)
    point = len(digits) + int(exponent)  # digits before the decimal point
    negative = "-" if sign else ""
    scientific = point - 1
    if scientific < -4 or scientific >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{negative}{mantissa}e{'-' if scientific < 0 else '+'}{abs(scientific):02d}"
    if point <= 0:
        return f"{negative}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return negative + digits + "0" * (point - len(digits))
    return f"{negative}{digits[:point]}.{digits[point:]}"


def _pad(text: str, flags: str, width: int, numeric: bool) -> str:
    if len(text) >= width:
        return text
    if "-" in flags:
        return text.ljust(width)
    if "0" in flags and numeric:
        sign = text[0] if text[:1] in "+- " else ""
        return sign + text[len(sign) :].rjust(width - len(sign), "0")
    return text.rjust(width)


# --- The others ---------------------------------------------------------------------------------------


def now_ns() -> int:
    return time.time_ns()


def json_is_valid(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def regex_split(pattern: str, text: str) -> list[str]:
    # Python's re instead of Go's RE2: the same for the expressions RE2 accepts.
    return re.split(pattern, text)


def trace(note: str) -> bool:
    log.info("policy trace: %s", note)
    return True


HOST_BUILTINS: dict[str, HostBuiltin] = {
    "sprintf": sprintf,
    "time.now_ns": now_ns,
    "json.is_valid": json_is_valid,
    "regex.split": regex_split,
    "trace": trace,
}
