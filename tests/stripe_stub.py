"""A small stand-in for Stripe's API on 127.0.0.1, for the stripe library (STRIPE_API_BASE).

It records every request and honours ``Idempotency-Key`` as Stripe does: a key seen before with
the same parameters gets the first response again (``Idempotent-Replayed: true``) and creates
nothing; the same key with other parameters is a 400 ``idempotency_error``.

Endpoints: ``POST /v1/customers/{id}/balance_transactions`` and
``GET /v1/checkout/sessions/{id}/line_items`` (answered from ``line_items``). Anything else is
Stripe's 404 error shape.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass
class StubRequest:
    method: str
    path: str
    params: dict[str, str]
    idempotency_key: str | None
    authorization: str | None
    replayed: bool = False


@dataclass
class StripeStub:
    base_url: str = ""
    requests: list[StubRequest] = field(default_factory=list)
    # Objects created (one per distinct idempotency key), in order.
    balance_transactions: list[dict[str, Any]] = field(default_factory=list)
    # checkout session id -> price ids of its line items
    line_items: dict[str, list[str]] = field(default_factory=dict)
    _keys: dict[str, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)
    _balances: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def posts(self, path_prefix: str = "/v1/") -> list[StubRequest]:
        with self._lock:
            return [
                r for r in self.requests if r.method == "POST" and r.path.startswith(path_prefix)
            ]

    # -- handling ----------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        key = headers.get("idempotency-key")
        request = StubRequest(method, path, params, key, headers.get("authorization"))
        with self._lock:
            self.requests.append(request)
            if not (request.authorization or "").startswith("Bearer sk_"):
                return 401, _error("invalid_request_error", "Invalid API Key provided."), {}
            if method == "POST" and key:
                fingerprint = json.dumps([path, sorted(params.items())])
                if key in self._keys:
                    seen, status, body = self._keys[key]
                    if seen != fingerprint:
                        return (
                            400,
                            _error(
                                "idempotency_error",
                                "Keys for idempotent requests can only be used with the same "
                                "parameters they were first used with.",
                            ),
                            {},
                        )
                    request.replayed = True
                    return status, body, {"Idempotent-Replayed": "true"}
            status, body = self._route(method, path, params)
            if method == "POST" and key:
                self._keys[key] = (json.dumps([path, sorted(params.items())]), status, body)
            return status, body, {"Idempotency-Key": key} if key else {}

    def _route(self, method: str, path: str, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        m = re.fullmatch(r"/v1/customers/(cus_[A-Za-z0-9]+)/balance_transactions", path)
        if m and method == "POST":
            customer = m.group(1)
            try:
                amount = int(params["amount"])
            except (KeyError, ValueError):
                return 400, _error("invalid_request_error", "Missing required param: amount.")
            balance = self._balances.get(customer, 0) + amount
            self._balances[customer] = balance
            txn = {
                "id": f"cbtxn_{uuid.uuid4().hex[:24]}",
                "object": "customer_balance_transaction",
                "amount": amount,
                "created": int(time.time()),
                "currency": params.get("currency", "usd"),
                "customer": customer,
                "description": params.get("description"),
                "ending_balance": balance,
                "invoice": None,
                "livemode": False,
                "metadata": {
                    k[len("metadata[") : -1]: v
                    for k, v in params.items()
                    if k.startswith("metadata[")
                },
                "type": "adjustment",
            }
            self.balance_transactions.append(txn)
            return 200, txn
        m = re.fullmatch(r"/v1/checkout/sessions/(cs_[A-Za-z0-9_]+)/line_items", path)
        if m and method == "GET":
            prices = self.line_items.get(m.group(1))
            if prices is None:
                return 404, _error(
                    "invalid_request_error", f"No such checkout.session: '{m.group(1)}'"
                )
            data = [
                {
                    "id": f"li_{i}",
                    "object": "item",
                    "amount_total": 1500,
                    "currency": "usd",
                    "description": "Managed PostgreSQL",
                    "price": {
                        "id": price,
                        "object": "price",
                        "currency": "usd",
                        "unit_amount": 1500,
                    },
                    "quantity": 1,
                }
                for i, price in enumerate(prices)
            ]
            return 200, {"object": "list", "data": data, "has_more": False, "url": path}
        return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path}).")


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


@contextmanager
def running_stub() -> Iterator[StripeStub]:
    stub = StripeStub()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8") if length else ""
            params = dict(parse_qsl(body or url.query, keep_blank_values=True))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload, extra = stub.handle(self.command, url.path, params, headers)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Request-Id", f"req_{uuid.uuid4().hex[:14]}")
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    stub.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
