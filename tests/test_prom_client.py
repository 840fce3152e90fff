"""The query client against the real Prometheus and VictoriaMetrics: answers, errors, auth, timeouts."""

from __future__ import annotations

import base64
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleaner.prom import PromClient, PromError, redact_url
from tests.support import Proc, free_port, have, start_prometheus, start_victoria_metrics, write_prometheus_config

pytestmark = pytest.mark.skipif(not (have("prometheus") and have("victoria-metrics")), reason="needs the binaries")

AT = 1_700_000_000.0
PASSWORD = "s3cret-pass-123456"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    root = tmp_path_factory.mktemp("prom")
    config = write_prometheus_config(root / "prometheus.yml", {})
    proc = start_prometheus(config, root / "data", root)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def vm_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    root = tmp_path_factory.mktemp("vm")
    proc = start_victoria_metrics(
        root / "data", root, None, "-httpAuth.username=cleaner", f"-httpAuth.password={PASSWORD}"
    )
    yield proc
    proc.stop()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with the class's canned body and remembers the headers it saw."""

    body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"seen": []})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=False)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_vector_comes_back_as_labelled_samples(prometheus: Proc) -> None:
    result = PromClient(prometheus.url).query('label_replace(vector(3), "model", "a", "", "")', AT)
    assert [(s.labels, s.value) for s in result.samples] == [({"model": "a"}, 3.0)]
    assert result.at == AT and result.seconds > 0


def test_queries_are_evaluated_at_the_given_instant(prometheus: Proc) -> None:
    assert PromClient(prometheus.url).query("time()", AT).samples[0].value == AT


def test_a_scalar_becomes_one_unlabelled_sample_and_empty_is_empty(prometheus: Proc) -> None:
    client = PromClient(prometheus.url)
    assert [(s.labels, s.value) for s in client.query("scalar(vector(2))", AT).samples] == [({}, 2.0)]
    assert client.query("no_such_metric_anywhere", AT).samples == ()


def test_a_bad_query_is_a_precondition_failure_naming_url_error_and_query(prometheus: Proc) -> None:
    with pytest.raises(PromError) as err:
        PromClient(prometheus.url).query("sum(", AT)
    message = err.value.one_line()
    assert err.value.exit_code == 4
    assert prometheus.url in message and "bad_data" in message and "sum(" in message


def test_a_range_vector_answer_is_refused(prometheus: Proc) -> None:
    with pytest.raises(PromError, match="expected an instant vector, got 'matrix'"):
        PromClient(prometheus.url).query("vector(1)[1m:30s]", AT)


def test_unreachable_prometheus_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PromError, match=rf"prometheus {url}: unreachable: .*refused"):
        PromClient(url).query("up", AT)


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # accepted by the kernel, never answered
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(PromError, match=r"unreachable: .*timed out"):
            PromClient(url, timeout=0.3).query("up", AT)


def test_basic_auth_against_victoria_metrics_and_a_path_prefix(vm_with_auth: Proc) -> None:
    base = vm_with_auth.url + "/prometheus"  # the prefix vmselect and Mimir use
    client = PromClient(base, username="cleaner", password=PASSWORD)
    assert client.query("vector(5)", AT).samples[0].value == 5


def test_wrong_credentials_say_so_without_echoing_the_password(vm_with_auth: Proc) -> None:
    with pytest.raises(PromError) as err:
        PromClient(vm_with_auth.url, username="cleaner", password="wrong-password-x").query("vector(1)", AT)
    message = err.value.one_line()
    assert "HTTP 401" in message and "username/password" in message
    assert "wrong-password-x" not in message


def test_credentials_in_the_url_are_used_and_never_shown(vm_with_auth: Proc) -> None:
    url = vm_with_auth.url.replace("http://", f"http://cleaner:{PASSWORD}@")
    client = PromClient(url)
    assert PASSWORD not in client.url
    assert client.query("vector(1)", AT).samples[0].value == 1
    assert redact_url(url) == vm_with_auth.url


def test_a_bearer_token_is_sent_as_an_authorization_header(recorder: tuple[str, type[_Recorder]]) -> None:
    url, handler = recorder
    PromClient(url, bearer_token="tok-0123456789abcdef").query("up", AT)
    PromClient(url, username="u", password="p").query("up", AT)
    assert handler.seen[0]["Authorization"] == "Bearer tok-0123456789abcdef"
    assert handler.seen[1]["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


def test_an_answer_that_is_not_json_is_a_clear_error(recorder: tuple[str, type[_Recorder]]) -> None:
    url, handler = recorder
    handler.body = b"<html>proxy error</html>"
    with pytest.raises(PromError, match="not JSON"):
        PromClient(url).query("up", AT)


def test_backend_warnings_are_kept(recorder: tuple[str, type[_Recorder]]) -> None:
    url, handler = recorder
    handler.body = b'{"status":"success","warnings":["partial response"],"data":{"resultType":"vector","result":[]}}'
    assert PromClient(url).query("up", AT).warnings == ("partial response",)


def test_only_http_urls_are_accepted(tmp_path: Path) -> None:
    with pytest.raises(PromError, match="not an http"):
        PromClient(f"file://{tmp_path}")
