"""Issue 14, finding 2: no log holds a key. A guard over the source: no logging call in the processes
that handle keys formats a value whose name says it is a key, a secret, a token, a password or a hash.
(``controlplane dev`` prints the seeded keys on its own terminal with print(), as asked; that is not
a log.) The dev stack's runner and projector logs are checked for keys in test_secret_runner_key.py."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "controlplane", "runners", "integrations", "core")
LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "log"})
SECRET_NAME = re.compile(r"key|secret|token|passw|sha256|hash|authoriz|bearer|credential", re.IGNORECASE)


def logging_calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LOG_METHODS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in ("log", "logger", "logging")
        ):
            yield node


def named_values(call: ast.Call) -> Iterator[str]:
    """The names read by the call's arguments (format arguments, f-string parts, keyword values)."""
    for argument in [*call.args, *(keyword.value for keyword in call.keywords if keyword.arg != "exc_info")]:
        for node in ast.walk(argument):
            if isinstance(node, ast.Name):
                yield node.id
            elif isinstance(node, ast.Attribute):
                yield node.attr
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                yield str(node.slice.value)


def test_no_logging_call_formats_a_key_or_a_hash() -> None:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for call in logging_calls(tree):
                suspicious = sorted({name for name in named_values(call) if SECRET_NAME.search(name)})
                if suspicious:
                    found.append(f"{path.relative_to(ROOT)}:{call.lineno} formats {', '.join(suspicious)}")
    assert not found, "\n".join(found)
