"""JSON for the plugin's hot path, without importing the ``json`` package.

``import json`` costs the plugin more than all its own code: ``json.decoder`` imports ``re``
(and through it ``enum``, ``functools``, ``collections``), several milliseconds for every pod
sandbox on the node. The C accelerators those modules wrap (``_json.make_scanner``,
``_json.make_encoder``) need none of that, so :func:`loads` and :func:`dumps` drive them
directly and behave as ``json.loads`` / ``json.dumps`` with default arguments (UTF-8 text,
``", "``/``": "`` separators, ASCII escapes). Where ``_json`` is missing they fall back to
``json``. Errors raise :class:`ValueError` (``json.JSONDecodeError`` is one).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # no ``typing`` at run time: it imports ``re`` too
    from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None  # type: ignore[assignment]

_WHITESPACE = " \t\n\r"


def _constant(name: str) -> float:
    return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


class _ScanContext:
    """The attributes ``_json.make_scanner`` reads (those of ``json.JSONDecoder``)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_constant)
    memo: dict[str, str] = {}  # noqa: RUF012 - the scanner's own cache, as in JSONDecoder


def _no_default(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


if _json is not None:
    _scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # duck-typed context


def loads(text: str | bytes) -> Any:
    """Parse one JSON document (``bytes`` must be UTF-8)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if _json is None:  # pragma: no cover
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        obj, end = _scan(text, start)
    except StopIteration as e:
        raise ValueError(f"Expecting value: char {e.value}") from None
    except Exception:
        # The scanner builds its error from json.decoder, which is not loaded (and in some
        # builds it then fails to raise at all): let ``json`` parse it again for the message.
        import json

        return json.loads(text)
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data: char {end}")
    return obj


def dumps(obj: Any) -> str:
    """``json.dumps(obj)`` with default arguments."""
    if _json is None:  # pragma: no cover
        import json

        return json.dumps(obj)
    # A fresh encoder per call: its first argument is the circular-reference memo.
    encode = _json.make_encoder(
        {}, _no_default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    return "".join(encode(obj, 0))
