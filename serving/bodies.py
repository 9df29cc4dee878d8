"""Request bodies to fields, before any field is validated: JSON (one flat object of finite numbers, nesting
bounded) and multipart/form-data (fields and files, one level). Every refusal is a ``RequestError`` (400 for a
body that cannot be read, 422 naming the field otherwise)."""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import json
import math
import re
from typing import Any

import numpy as np

from serving.schema import RequestError

# A request is one flat object; nesting is checked without recursion before the (recursive) parsers run,
# so no body can make them overflow the interpreter's stack (that would be a 500).
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a complete JSON string literal (unrolled loop)
_HEADER_END = re.compile(rb"\r?\n\r?\n")


class _NonFinite:
    """Stands in for NaN/Infinity while parsing, so the error can name the field that held it."""


class _Unrepresentable(ValueError):
    """A JSON number outside float's range (``1e999``), which Python's json would read as inf."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Unrepresentable(f"the number {text[:40]!r} is outside the range of a float")
    return value


def json_depth(body: bytes) -> int:
    """How deeply ``[``/``{`` nest in a JSON text, brackets inside string literals ignored.

    Linear and non-recursive: strings are blanked with one regular expression, then the running
    count of opening minus closing brackets is a cumulative sum. ``b'{"a": [[1], "]["]}'`` -> 3.
    """
    codes = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    if codes.size == 0:
        return 0
    opens = (codes == ord("[")) | (codes == ord("{"))
    closes = (codes == ord("]")) | (codes == ord("}"))
    return int(max(0, np.cumsum(opens.astype(np.int64) - closes.astype(np.int64)).max()))


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Bytes -> JSON object; NaN/Infinity (which Python's json accepts), numbers beyond a float,
    nesting deeper than ``MAX_JSON_DEPTH`` and non-objects refused."""
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise RequestError("body", f"JSON nested {depth} levels deep; the limit is {MAX_JSON_DEPTH} "
                                   "(a request is one flat object)", 400)
    try:
        data = json.loads(body, parse_constant=lambda name: _NonFinite(), parse_float=_finite_float)
    except _Unrepresentable as exc:
        raise RequestError("body", f"{exc}; send a finite number", 400) from None
    except RecursionError:  # unreachable below MAX_JSON_DEPTH; kept so no parser limit can become a 500
        raise RequestError("body", f"JSON nested too deeply; the limit is {MAX_JSON_DEPTH}", 400) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError("body", f"not valid JSON ({exc})", 400) from None
    if not isinstance(data, dict):
        raise RequestError("body", f"must be a JSON object, got {type(data).__name__}", 400)
    for key, value in data.items():
        if isinstance(value, _NonFinite) or (isinstance(value, list) and any(isinstance(v, _NonFinite) for v in value)):
            raise RequestError(str(key), "NaN/Infinity is not a JSON number; send a finite number")
    return data


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """multipart/form-data -> (text fields, file parts), with the standard library's MIME parser.

    Duplicate field names are refused (a client bug, not something to resolve silently), and so are
    parts that are multiparts themselves (checked on the parts' headers before the recursive parser
    runs: nested deeply enough, they would overflow its stack).
    """
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    boundary = email.message.Message()
    boundary["Content-Type"] = content_type
    delimiter = boundary.get_param("boundary")
    if isinstance(delimiter, str) and delimiter:
        for part in body.split(b"--" + delimiter.encode("latin-1", "replace"))[1:]:
            headers = _HEADER_END.split(part, maxsplit=1)[0]
            if b"multipart/" in headers.lower():
                raise RequestError("body", "a form part is itself multipart; form-data nests one level only "
                                           "(fields and files)", 400)
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise RequestError("body", "not a valid multipart/form-data body (missing or wrong boundary)", 400)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise RequestError("body", "a multipart part has no name", 400)
        if name in fields or name in files:
            raise RequestError(name, "given more than once", 422)
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[name] = payload
        else:
            try:
                fields[name] = payload.decode(part.get_content_charset() or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise RequestError(name, "form field is not valid UTF-8 text", 422) from None
    return fields, files
