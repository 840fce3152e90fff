"""A small client for the standard Prometheus instant-query API (Prometheus, Thanos, Mimir, VictoriaMetrics)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from shared.errors import PreconditionError
from shared.typed_settings import PrometheusSettings


class PromError(PreconditionError):
    """Prometheus was unreachable or answered an error: nothing was decided, nothing touched."""

    code = "prometheus_failed"


@dataclass(frozen=True, slots=True)
class Sample:
    labels: dict[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class QueryResult:
    """One instant query's answer, with what it cost and the backend's own warnings."""

    expr: str
    at: float
    samples: tuple[Sample, ...]
    seconds: float
    warnings: tuple[str, ...] = field(default=())


def redact_url(url: str) -> str:
    """The URL without user:password@, so it can appear in messages and plans."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class PromClient:
    """POSTs `/api/v1/query` under a base URL (which may carry a path prefix, as Mimir and vmselect need)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        bearer_token: str = "",
        username: str = "",
        password: str = "",
    ) -> None:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PromError(f"prometheus: {redact_url(url)!r} is not an http(s) URL")
        if parts.username and not username:
            username, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
        self.url = redact_url(url.strip()).rstrip("/")
        self.timeout = timeout
        self._headers = {"Accept": "application/json", "User-Agent": "model-storage-cleaner"}
        if bearer_token:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        elif username:
            pair = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {pair}"

    @classmethod
    def from_settings(cls, prometheus: PrometheusSettings) -> PromClient:
        return cls(
            prometheus.url,
            timeout=prometheus.timeout_seconds,
            bearer_token=prometheus.bearer_token,
            username=prometheus.username,
            password=prometheus.password,
        )

    def query(self, expr: str, at: float) -> QueryResult:
        """Evaluate `expr` at the instant `at`; a vector (or scalar) comes back as samples."""
        body = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"}).encode()
        headers = {**self._headers, "Content-Type": "application/x-www-form-urlencoded"}
        endpoint = self.url + "/api/v1/query"
        # The scheme was checked to be http(s) in __init__.
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")  # noqa: S310
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                raw = response.read()
        except urllib.error.HTTPError as err:
            raise self._http_error(err, expr) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise PromError(f"prometheus {self.url}: unreachable: {reason}") from None
        except OSError as err:
            raise PromError(f"prometheus {self.url}: unreachable: {err}") from None
        seconds = time.monotonic() - started
        data = self._decode(raw)
        if data.get("status") != "success":
            raise PromError(f"prometheus {self.url}: {self._error_text(data)} in query {shorten(expr)}")
        samples = parse_result(data.get("data"), self.url)
        warnings = tuple(str(w) for w in data.get("warnings") or ())
        return QueryResult(expr=expr, at=at, samples=samples, seconds=seconds, warnings=warnings)

    def _decode(self, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError:
            raise PromError(f"prometheus {self.url}: answered something that is not JSON: {raw[:80]!r}") from None
        if not isinstance(data, dict):
            raise PromError(f"prometheus {self.url}: answered an unexpected JSON document")
        return data

    def _http_error(self, err: urllib.error.HTTPError, expr: str) -> PromError:
        if err.code in (401, 403):
            return PromError(
                f"prometheus {self.url}: HTTP {err.code} {err.reason}",
                hint="check cleaner.prometheus bearer_token or username/password",
            )
        try:
            data = json.loads(err.read())
            detail = self._error_text(data) if isinstance(data, dict) else ""
        except (ValueError, OSError):
            detail = ""
        if detail:
            return PromError(f"prometheus {self.url}: HTTP {err.code}: {detail} in query {shorten(expr)}")
        return PromError(f"prometheus {self.url}: HTTP {err.code} {err.reason}")

    @staticmethod
    def _error_text(data: dict[str, Any]) -> str:
        kind = str(data.get("errorType") or "error")
        return f"{kind}: {' '.join(str(data.get('error') or 'no detail').split())}"


def parse_result(data: Any, url: str = "") -> tuple[Sample, ...]:
    """The `data` member of a query answer -> samples (a scalar becomes one unlabelled sample)."""
    if not isinstance(data, dict):
        raise PromError(f"prometheus {url}: answer has no data")
    kind = data.get("resultType")
    result: Any = data.get("result")
    try:
        if kind == "vector":
            return tuple(Sample(dict(item.get("metric") or {}), float(item["value"][1])) for item in result)
        if kind == "scalar":
            return (Sample({}, float(result[1])),)
    except (TypeError, KeyError, IndexError, ValueError):
        raise PromError(f"prometheus {url}: malformed {kind} in the answer") from None
    raise PromError(f"prometheus {url}: expected an instant vector, got {kind!r}")


def shorten(expr: str, limit: int = 160) -> str:
    text = " ".join(expr.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
