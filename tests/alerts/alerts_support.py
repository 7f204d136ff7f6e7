"""Helpers of the alert tests (imported by name: test modules cannot import a conftest)."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

from tailmon.estimation.result import RunFigures
from tailmon.monitor.config import parse_config

MONITOR = {
    "name": "prod",
    "prompts": {"type": "file", "path": "prompts.jsonl", "per_run": 3},
    "judge": "prefix:Sure",
    "proposals": ["system:Sure"],
    "volume": {"per_day": 1000000, "windows": ["1h", "1d"]},
    "schedule": {"every": "1h"},
}


def make_config(alerts=(), sinks=None, monitors=None, **top):
    """A validated Config (no model is loaded): monitor `prod` with `alerts`, plus `sinks`."""
    mons = monitors or [{**MONITOR, "alerts": list(alerts)}]
    return parse_config(yaml.safe_dump({"alert_sinks": sinks or {}, "monitors": mons, **top}), "t.yaml")


def figures(**kw) -> RunFigures:
    """The figures of `report(**kw)`, as the daemon hands a run's figures to the alert rules."""
    return RunFigures.from_report(report(**kw))


def report(p_hat=1e-3, ci_low=5e-4, ci_high=2e-3, reliable=True, ess_wh=50.0, khat=0.3, worst=0.02):
    """The daemon's stored report, reduced to what the rules read (RunResult.to_dict() keys).

    Two prompts: the weakest (ESS of w*h `ess_wh`, k-hat `khat`) and a healthier one (ESS 4x as
    large, k-hat 0.2 lower), so that a rule reading the wrong end of either is caught.
    P(any) is 1 - (1 - P)^V at p_hat, ci_low and ci_high, three different figures."""
    def estimate(prompt, ess, k):
        return {"prompt": prompt, "category": None, "method": "is", "n_samples": 20, "p_hat": p_hat,
                "ci_low": ci_low, "ci_high": ci_high, "n_harmful": 5, "ess": 10.0, "ess_wh": ess, "khat": k,
                "reliable": reliable, "upper_bound_only": False, "warnings": []}

    def p_any(p, v):
        return -math.expm1(v * math.log1p(-p))

    ex = {w: {"window": w, "volume": v, "expected_per_window": {"expected": v * p_hat, "ci_low": v * ci_low,
                                                                 "ci_high": v * ci_high},
              "p_any_per_window": {"p": p_any(p_hat, v), "ci_low": p_any(ci_low, v), "ci_high": p_any(ci_high, v)},
              "worst_query": {"p": worst, "ci_low": worst / 3, "ci_high": worst * 3} if worst is not None else None}
          for w, v in (("1h", 1e6 / 24), ("1d", 1e6))}
    return {"estimates": [estimate("x", ess_wh, khat), estimate("y", 4 * ess_wh, khat - 0.2)], "extrapolations": ex,
            "aggregate": {"n_prompts": 2, "n_samples": 40, "p_hat": p_hat, "ci_low": ci_low, "ci_high": ci_high,
                          "std_error": 1e-4, "n_harmful": 10, "reliable": reliable}}


@dataclass
class Request:
    path: str
    headers: dict
    body: bytes
    at: float
    signature_ok: bool | None
    """None when the receiver has no secret to check against."""

    def json(self):
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server on loopback that records every POST.

    fail_first: answer the first k requests with `fail_status`; hang: hold every request until
    released (or the client gives up); secret: check X-Tailmon-Signature against the body.
    """

    fail_first: int = 0
    fail_status: int = 500
    status: int = 200
    hang: bool = False
    secret: bytes | None = None
    requests: list = field(default_factory=list)

    def start(self) -> "Receiver":
        owner = self
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ok = None
                if owner.secret is not None:
                    expected = "sha256=" + hmac.new(owner.secret, body, hashlib.sha256).hexdigest()
                    ok = hmac.compare_digest(expected, self.headers.get("X-Tailmon-Signature", ""))
                owner.requests.append(Request(self.path, dict(self.headers), body, time.monotonic(), ok))
                if owner.hang:
                    owner.release.wait(30)
                code = owner.fail_status if len(owner.requests) <= owner.fail_first else owner.status
                if ok is False:
                    code = 401
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def wait_for(self, n: int, timeout: float = 10) -> list:
        deadline = time.time() + timeout
        while len(self.requests) < n and time.time() < deadline:
            time.sleep(0.01)
        assert len(self.requests) >= n, f"expected {n} requests, got {len(self.requests)}"
        return self.requests

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
