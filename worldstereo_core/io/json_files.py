"""Reading JSON files with errors that name the file (and the line of a syntax error)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import InputError


def read_json(path: str | os.PathLike, what: str = "file", *,
              missing: type[Exception] = InputError) -> Any:
    """Parse a JSON file. A missing file raises ``missing`` (e.g. MissingWeightsError for weights)."""
    path = Path(path)
    if not path.is_file():
        raise missing(f"{what} not found: {path}; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path}: cannot be read as UTF-8 text ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{what} {path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; fix the file "
            "syntax (e.g. trailing commas, missing brackets) or re-download it"
        ) from exc


def read_json_object(path: str | os.PathLike, what: str = "file", *,
                     missing: type[Exception] = InputError) -> dict:
    """:func:`read_json` for files that must hold a JSON object."""
    data = read_json(path, what, missing=missing)
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data
