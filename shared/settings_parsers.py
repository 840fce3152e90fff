"""Value parsers for the settings table: each takes (key, value) from YAML or the environment and
returns the typed value or raises a one-line ConfigError naming the key and what was expected.
Pure apart from `Path` as a value type: no file is read here (secret files are read by the loader).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

Parser = Callable[[str, Any], Any]


def expect(key: str, value: Any, expected: str) -> ConfigError:
    shown = repr(value) if not isinstance(value, str) else repr(value[:80])
    return ConfigError(f"config: {key}={shown}: expected {expected}")


def number(minimum: float | None = None, maximum: float | None = None, *, strict_min: bool = False) -> Parser:
    def parse(key: str, value: Any) -> float:
        expected = "a number"
        if minimum is not None:
            expected += f" {'>' if strict_min else '>='} {minimum:g}"
        if maximum is not None:
            expected += f" and <= {maximum:g}"
        if isinstance(value, bool):
            raise expect(key, value, expected)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise expect(key, value, expected) from None
        if not math.isfinite(number):
            raise expect(key, value, expected)
        too_small = minimum is not None and (number <= minimum if strict_min else number < minimum)
        if too_small or (maximum is not None and number > maximum):
            raise expect(key, value, expected)
        return number

    return parse


def integer(minimum: int = 0) -> Parser:
    def parse(key: str, value: Any) -> int:
        expected = f"a whole number >= {minimum}"
        if isinstance(value, bool):
            raise expect(key, value, expected)
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                raise expect(key, value, expected) from None
        if number < minimum:
            raise expect(key, value, expected)
        return number

    return parse


def string(key: str, value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise expect(key, value, "a string")
    return str(value)


def optional_string(key: str, value: Any) -> str:
    return "" if value is None else string(key, value)


def optional_secret(key: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"config: {key}: expected a string (quote it in YAML); the value is not shown")
    return value


def path(key: str, value: Any) -> Path:
    text = string(key, value)
    if not text.strip():
        raise expect(key, value, "a non-empty path")
    return Path(text)


def optional_path(key: str, value: Any) -> Path | None:
    if value is None or value == "":
        return None
    return path(key, value)


def boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise expect(key, value, "true or false")


def choice(choices: Sequence[str]) -> Parser:
    def parse(key: str, value: Any) -> str:
        text = string(key, value).strip().lower()
        if text not in choices:
            raise expect(key, value, "one of " + ", ".join(choices))
        return text

    return parse


def string_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list | tuple):
        items = [string(key, item).strip() for item in value]
    else:
        raise expect(key, value, "a comma-separated list")
    return tuple(item for item in items if item)


def networks(key: str, value: Any) -> tuple[str, ...]:
    """Addresses or CIDRs, normalised to networks (`10.0.0.1` -> `10.0.0.1/32`)."""
    found = []
    for item in string_list(key, value):
        try:
            found.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise expect(key, value, "IP addresses or CIDRs, comma-separated, e.g. 10.0.0.5,172.18.0.0/16") from None
    return tuple(dict.fromkeys(found))


def subset(choices: Sequence[str], *, allow_empty: bool = True) -> Parser:
    def parse(key: str, value: Any) -> tuple[str, ...]:
        items = string_list(key, value)
        unknown = [item for item in items if item not in choices]
        if unknown or (not items and not allow_empty):
            raise expect(key, value, "a comma-separated subset of " + ", ".join(choices))
        return tuple(dict.fromkeys(items))

    return parse


def dir_name(key: str, value: Any) -> str:
    text = string(key, value)
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise expect(key, value, "a plain directory name (no '/')")
    return text


def trash_limit(key: str, value: Any) -> float:
    """Trash retention and cap: 0 would purge each evicted model at once, a silent backup mode `none`."""
    try:
        limit: float = number(0, strict_min=True)(key, value)
    except ConfigError as err:
        raise ConfigError(
            err.message, hint="to delete evicted models directly, choose STORAGE_BACKUP_MODE=none explicitly"
        ) from None
    return limit


_LISTEN = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:\s]+):(?P<port>\d{1,5})$")


def listen(key: str, value: Any) -> tuple[str, int]:
    text = string(key, value).strip()
    match = _LISTEN.match(text)
    if not match or not 0 <= int(match["port"]) <= 65535:
        raise expect(key, value, "HOST:PORT, e.g. 127.0.0.1:8470")
    return match["host"].strip("[]"), int(match["port"])


_MATCHER = re.compile(r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*')


def matchers(key: str, value: Any) -> str:
    """Extra label matchers added to every selector: `name="value",name2=~"re"`."""
    text = optional_string(key, value).strip().strip("{}").strip()
    if not text:
        return ""
    position = 0
    while position < len(text):
        match = _MATCHER.match(text, position)
        if not match:
            raise expect(key, value, 'label matchers like instance="host:8470",job="models"')
        position = match.end()
        if position < len(text):
            if text[position] != ",":
                raise expect(key, value, 'label matchers like instance="host:8470",job="models"')
            position += 1
    return text


TOKEN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_TOKEN_CHARS = 16
# `name=TOKEN`, the form before named tokens took `name:`: an `=` followed by something other
# than `=`. Base64 padding (`=` only at the end) is not it, so generator output reads as a token.
_OLD_NAMED_FORM = re.compile(r"=[^=]")
_TOKEN_FORMS = "TOKEN or NAME:TOKEN, comma-separated"  # noqa: S105 - the syntax, not a secret


def _token_error(key: str, where: str, problem: str, hint: str = "") -> ConfigError:
    # Never any part of the value: this message reaches stderr and the logs. Items are named by position.
    return ConfigError(f"config: {key}: {where}: {problem}", hint=hint)


def _check_token(key: str, where: str, token: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise _token_error(key, where, f"expected a token of at least {MIN_TOKEN_CHARS} characters")
    if any(char.isspace() for char in token):
        raise _token_error(
            key, where, "a token may not contain whitespace", hint="a wrapped base64 line? generate with base64 -w0"
        )


def _token_item(key: str, where: str, item: str, default_name: str) -> tuple[str, str]:
    """One list item: a bare token (named `default_name`) or `NAME:TOKEN`."""
    name, colon, token = item.partition(":")
    if not colon:
        if _OLD_NAMED_FORM.search(item):
            raise _token_error(
                key,
                where,
                "the form NAME=TOKEN is no longer read (an = inside a token is ambiguous)",
                hint=f"write NAME:TOKEN instead (a colon); tokens are {_TOKEN_FORMS}",
            )
        name, token = default_name, item
    elif not TOKEN_NAME.fullmatch(name):
        raise _token_error(key, where, f"expected {_TOKEN_FORMS}, a NAME of 1-64 of [A-Za-z0-9_.-]")
    if ":" in token:
        raise _token_error(key, where, f"expected {_TOKEN_FORMS}; a token may not contain ':'")
    _check_token(key, where, token)
    return name, token


def tokens(key: str, value: Any) -> dict[str, str]:
    """`TOKEN` (named `admin`/`read`) or `name:TOKEN,name2:TOKEN2`, or a YAML mapping name -> token.

    Bare tokens are what generators print (base64 with `=` padding, urlsafe base64, hex); a name is
    set apart by `:`, which none of them prints. Errors never show any part of the value.
    """
    default_name = "admin" if "admin" in key.lower() else "read"
    if value is None or value == "":
        return {}
    pairs: dict[str, str] = {}
    if isinstance(value, Mapping):
        for position, (name, token) in enumerate(value.items(), start=1):
            where = f"entry {position} of {len(value)}"
            if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
                raise _token_error(key, where, "expected a name of 1-64 of [A-Za-z0-9_.-]")
            if not isinstance(token, str):
                raise _token_error(key, where, "expected the token as a string (quote it in YAML)")
            _check_token(key, where, token.strip())
            pairs[name] = token.strip()
        return pairs
    if not isinstance(value, str):
        raise _token_error(key, "value", f"expected a string of {_TOKEN_FORMS}, or a mapping of name to token")
    items = [part.strip() for part in value.strip().split(",")]
    bare = 0
    for position, item in enumerate(items, start=1):
        where = f"item {position} of {len(items)}"
        if not item:
            raise _token_error(key, where, f"empty; expected {_TOKEN_FORMS}")
        name, token = _token_item(key, where, item, default_name)
        if ":" not in item:
            # Several bare tokens (a rotation: old,new) are `admin`, `admin-2`, ...
            bare += 1
            name = default_name if bare == 1 else f"{default_name}-{bare}"
        if name in pairs:
            raise _token_error(key, where, "its name is already given to an earlier item; expected one token per name")
        pairs[name] = token
    return pairs
