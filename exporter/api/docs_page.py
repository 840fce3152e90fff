"""The HTML /docs page: every operation of the OpenAPI document, each with a form that tries it. Pure.

Invariants:
- The text taken from the document (title, paths, summaries, descriptions, parameters, schemas) is
  HTML-escaped; the page loads nothing from elsewhere and sends requests to its own origin only.
- The page's only script and style are DOCS_SCRIPT and DOCS_STYLE, allowed by hash in DOCS_CSP:
  change either and the hash follows, since both are computed here from the same strings.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from exporter.api.csp import csp_hash
from exporter.api.openapi import ADMIN_SECURITY, READ_SECURITY

# The docs page's only script: each operation's form sends its request with the token typed at the
# top (kept in the page, never stored) and shows the answer. Served under a CSP that allows exactly
# this script and style by hash and connections to this origin only.
DOCS_SCRIPT = """
for (const form of document.querySelectorAll("form.try")) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const field of form.querySelectorAll("input[data-param]")) {
      if (field.value !== "") query.append(field.dataset.param, field.value);
    }
    const headers = {};
    const token = document.getElementById("token").value.trim();
    if (token !== "") headers["Authorization"] = "Bearer " + token;
    const out = form.querySelector("output");
    out.textContent = "...";
    const url = form.dataset.path + (query.toString() ? "?" + query : "");
    try {
      const response = await fetch(url, {method: form.dataset.method, headers});
      const text = await response.text();
      let body = text;
      try { body = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* not JSON: as is */ }
      out.textContent = response.status + " " + response.statusText + "\\n" + body;
    } catch (error) {
      out.textContent = String(error);
    }
  });
}
"""
DOCS_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:auto}section{border-top:1px solid #ccc}"
    "pre,output{display:block;white-space:pre-wrap;background:#f4f4f4;padding:1em;overflow:auto}"
    "form.try{margin:.5em 0}form.try label{margin-right:1em}"
)


DOCS_CSP = (
    f"default-src 'none'; script-src {csp_hash(DOCS_SCRIPT)}; style-src {csp_hash(DOCS_STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _try_form(method: str, path: str, parameters: Sequence[Mapping[str, Any]]) -> str:
    fields = "".join(
        f"<label>{html.escape(p['name'])} <input data-param='{html.escape(p['name'])}' "
        f"placeholder='{html.escape(str(p['schema'].get('default', '')))}'></label>"
        for p in parameters
    )
    return (
        f"<form class='try' data-method='{method.upper()}' data-path='{html.escape(path)}'>"
        f"{fields}<button type='submit'>Send {method.upper()} {html.escape(path)}</button><output></output></form>"
    )


def docs_page(spec: Mapping[str, Any]) -> str:
    """A self-contained HTML page describing every operation, each with a form that tries it."""
    rows: list[str] = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            security = op.get("security", [])
            if security == ADMIN_SECURITY:
                access = "admin token"
            elif security == READ_SECURITY:
                access = "read or admin token, when a read token is configured"
            else:
                access = "open"
            params = ", ".join(
                f"<code>{html.escape(p['name'])}</code> ({html.escape(json.dumps(p['schema']))})"
                for p in op.get("parameters", [])
            )
            responses = ", ".join(
                f"<b>{code}</b> {html.escape(r['description'])}" for code, r in op["responses"].items()
            )
            rows.append(
                f"<section><h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                f"<p>{html.escape(op['summary'])}. {html.escape(op.get('description', ''))}</p>"
                f"<p>Access: {access}.</p>"
                + (f"<p>Query parameters: {params}</p>" if params else "")
                + f"<p>Responses: {responses}</p>"
                + _try_form(method, path, op.get("parameters", []))
                + "</section>"
            )
    schemas = html.escape(json.dumps(spec["components"]["schemas"], indent=2))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(spec['info']['title'])} API</title>"
        f"<style>{DOCS_STYLE}</style></head><body>"
        f"<h1>{html.escape(spec['info']['title'])} API {html.escape(spec['info']['version'])}</h1>"
        f"<p>{html.escape(spec['info']['description'])}</p>"
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1). Send tokens as "
        "<code>Authorization: Bearer TOKEN</code>, e.g. <code>curl -X POST -H 'Authorization: Bearer $TOKEN' "
        "http://127.0.0.1:8470/storage/cleanup?dry_run=true</code>.</p>"
        "<p><label>Token for the forms below <input id='token' type='password' autocomplete='off'></label> "
        "(sent as a bearer token with each request; kept only in this page). "
        "<b>A POST really runs</b>: <code>/storage/cleanup</code> without <code>dry_run=true</code> evicts "
        "models.</p>"
        + "".join(rows)
        + f"<h2>Schemas</h2><pre>{schemas}</pre><script>{DOCS_SCRIPT}</script></body></html>"
    )
