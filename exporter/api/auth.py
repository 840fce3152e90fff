"""Bearer tokens for the storage API: who is calling (named tokens, constant-time) and what they may do."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Role = Literal["admin", "read"]
Need = Literal["admin", "read"]

ANONYMOUS = "anonymous"
ADMIN_DISABLED_MESSAGE = (
    "admin operations are disabled: no admin token is configured; set STORAGE_ADMIN_TOKEN "
    "(or STORAGE_ADMIN_TOKEN_FILE, e.g. a Docker secret or systemd credential) and restart the exporter"
)
UNAUTHORIZED_MESSAGE = "missing or invalid bearer token"


@dataclass(frozen=True, slots=True)
class Caller:
    """The outcome of reading the Authorization header: `role` None means no or an unknown token."""

    name: str
    role: Role | None
    presented: bool  # an Authorization header was sent

    @property
    def authenticated(self) -> bool:
        return self.role is not None


@dataclass(frozen=True, slots=True)
class Denial:
    status: int
    code: str
    message: str
    audit_operation: str  # `api.auth_failed` (401) or `api.denied` (403)


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of the token's length too.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenBook:
    """The configured tokens, kept only as digests; `identify` compares against every one, every time."""

    def __init__(self, admin: Mapping[str, str] | None, read: Mapping[str, str] | None) -> None:
        admin, read = admin or {}, read or {}
        self._entries: list[tuple[bytes, str, Role]] = [(_digest(t), n, "admin") for n, t in admin.items()]
        self._entries += [(_digest(t), n, "read") for n, t in read.items()]
        self.admin_enabled = bool(admin)
        self.read_required = bool(read)

    def identify(self, authorization: str | None) -> Caller:
        if authorization is None:
            return Caller(ANONYMOUS, None, presented=False)
        scheme, _, token = authorization.strip().partition(" ")
        candidate = _digest(token.strip())
        found: tuple[str, Role] | None = None
        # No early exit: every configured token is compared, whichever matches.
        for digest, name, role in self._entries:
            if hmac.compare_digest(digest, candidate) and found is None:
                found = (name, role)
        if scheme.lower() != "bearer" or not token.strip() or found is None:
            return Caller(ANONYMOUS, None, presented=True)
        return Caller(found[0], found[1], presented=True)


def authorize(book: TokenBook, caller: Caller, need: Need) -> Denial | None:
    """None when `caller` may do what needs `need`; else the answer to give. Pure."""
    if need == "admin" and not book.admin_enabled:
        return Denial(403, "admin_disabled", ADMIN_DISABLED_MESSAGE, "api.denied")
    if caller.presented and not caller.authenticated:
        return Denial(401, "unauthorized", UNAUTHORIZED_MESSAGE, "api.auth_failed")
    if need == "read" and not book.read_required:
        return None
    if not caller.authenticated:
        return Denial(401, "unauthorized", UNAUTHORIZED_MESSAGE, "api.auth_failed")
    if need == "admin" and caller.role != "admin":
        return Denial(403, "forbidden", "this operation needs an admin token", "api.denied")
    return None
