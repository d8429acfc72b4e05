"""Metadata values at the edges of what the catalogs store: kept exactly, or refused.

Shared by the embedded-registry tests and the server tests (SQLite and
PostgreSQL), so every catalog is held to the same table.
"""

from __future__ import annotations

from typing import Any


def nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` lists, one inside the other, around ``leaf``."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


#: (label, metadata): registered, then read back equal on every catalog.
KEPT: list[tuple[str, dict[str, Any]]] = [
    ("int64 max", {"n": 2**63 - 1}),
    ("int64 min", {"n": -(2**63)}),
    ("float just below 1e16", {"flux": 9.999999999999998e15}),
    ("tiny float", {"x": 1e-300}),
    ("negative float", {"x": -273.15}),
    ("zero float", {"x": 0.0}),
    ("unicode", {"sample": "Überstruktur 中文 🙂", "ångström": 1.54}),
    ("control characters", {"note": "a\tb\nc\r"}),
    ("31 levels", {"deep": nested(31)}),
    ("bool and null", {"flag": True, "none": None, "list": [False, None, 1, "a"]}),
    ("nested dict", {"sample": {"name": "silica", "d_nm": 150, "tags": ["a", "b"]}}),
    ("long list", {"frames": list(range(2000))}),
]

#: (label, metadata, part of the message): refused, nothing written.
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("int64 max + 1", {"n": 2**63}, "int64"),
    ("int64 min - 1", {"n": -(2**63) - 1}, "int64"),
    ("2**64", {"n": 2**64}, "int64"),
    ("2**70 nested", {"a": {"b": [2**70]}}, "metadata['a']['b'][0]"),
    ("1e16", {"flux": 1e16}, "1e16"),
    ("1e20", {"flux": 1e20}, "'1e+20'"),
    ("-1e300", {"x": -1e300}, "1e16"),
    ("NUL in a value", {"note": "a\x00b"}, "NUL"),
    ("NUL in a nested key", {"a": {"k\x00": 1}}, "NUL"),
    ("NUL in a list", {"a": ["ok", "\x00"]}, "metadata['a'][1]"),
    ("lone surrogate", {"note": "bad \udc80 bytes"}, "surrogate"),
    ("lone surrogate key", {"a": {"\ud800": 1}}, "surrogate"),
    ("32 levels", {"deep": nested(32)}, "32 levels"),
    ("300 levels", {"deep": nested(300)}, "metadata['deep']"),
    ("int key nested", {"a": {1: "x"}}, "keys must be strings"),
    ("tuple key nested", {"a": {("x", "y"): 1}}, "keys must be strings"),
    ("nan nested", {"a": [float("nan")]}, "NaN"),
    ("inf nested", {"a": {"b": float("-inf")}}, "JSON-serializable"),
    ("set nested", {"a": [{1, 2}]}, "JSON-serializable"),
    ("bytes", {"a": b"raw"}, "JSON-serializable"),
    ("over 256 KiB", {"blob": "x" * (300 * 1024)}, "KiB"),
]
