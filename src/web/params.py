"""Query-string arguments, parsed strictly: anything unexpected is a 400, never a 500."""

from __future__ import annotations

import re

from flask import request
from werkzeug.exceptions import BadRequest

# ASCII digits only (int() would take "٣", " 7" or "1_0"), and few enough to stay small.
_WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")


def whole_number(name: str, *, default: int, highest: int, or_word: str | None = None) -> int:
    """``?name=`` as a whole number from 1 to ``highest``; ``default`` when absent or empty.

    ``or_word`` only changes the message of the 400: the caller accepts that word itself.
    """
    value = request.args.get(name)
    if value is None or value == "":
        return default
    if _WHOLE_NUMBER.fullmatch(value) and 1 <= int(value) <= highest:
        return int(value)
    expected = f"a whole number from 1 to {highest}" + (f" or '{or_word}'" if or_word else "")
    raise BadRequest(f"{name} must be {expected}.")
