"""A log-only Alertmanager webhook receiver: each notification becomes one JSON line on stdout.

The compose stack's example receivers (deploy/alertmanager/alertmanager.yml) point here, so an
alert is delivered somewhere visible out of the box (`docker compose logs alert-webhook`) until
you replace the URLs with your pager and chat bridges. Standard library only; it runs in the
model-storage image. Listens on 0.0.0.0:9095 inside the compose network (no published port).
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY_BYTES = 1 << 20


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        # The container's healthcheck.
        self._answer(200 if self.path == "/-/healthy" else 404)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._answer(413)
            return
        try:
            payload = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._answer(400)
            return
        alerts = payload.get("alerts", []) if isinstance(payload, dict) else []
        line = {
            "event": "alert_webhook.received",
            "receiver_path": self.path,
            "status": payload.get("status") if isinstance(payload, dict) else None,
            "alerts": [
                {
                    "alertname": a.get("labels", {}).get("alertname"),
                    "status": a.get("status"),
                    "labels": a.get("labels", {}),
                    "summary": a.get("annotations", {}).get("summary"),
                }
                for a in alerts
                if isinstance(a, dict)
            ],
        }
        sys.stdout.write(json.dumps(line, sort_keys=True) + "\n")
        sys.stdout.flush()
        self._answer(200)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Access lines are noise next to the notifications."""


def main() -> None:
    host, _, port = os.environ.get("ALERT_WEBHOOK_LISTEN", "0.0.0.0:9095").rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    sys.stdout.write(json.dumps({"event": "alert_webhook.started", "listen": f"{host}:{port}"}) + "\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
