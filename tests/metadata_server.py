"""A stand-in for a cloud VM's metadata service (GCE and AWS IMDSv2), for tests on loopback.

The real services exist only on a VM (169.254.169.254), so tests run this one on a loopback address
per "host" (127.0.0.2, 127.0.0.3, ...: every 127.x address is local on Linux) and point the spot
watcher at it. It implements the documented endpoints the watcher uses, with their rules:

GCE
- `GET /computeMetadata/v1/instance/preempted` -> `FALSE`/`TRUE`, with an `ETag`; 403 without the
  header `Metadata-Flavor: Google`.
- `?wait_for_change=true` blocks until the value differs from the one the client last saw (`last_etag`,
  or the value when the request arrived), then returns the new value; `&timeout_sec=N` returns the
  current value after N seconds if nothing changed.

AWS (IMDSv2)
- `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` (1-21600, else 400) -> a token.
- Every GET needs `X-aws-ec2-metadata-token` with a live token: 401 otherwise.
- `GET /latest/meta-data/spot/instance-action` -> 404 until a notice, then
  `{"action": "terminate", "time": "<UTC, notice + 120 s>"}`.
- `GET /latest/meta-data/events/recommendations/rebalance` -> 404, or `{"noticeTime": "<UTC>"}`.

Test controls (no cloud has these), under `/_test/`, or as methods of `MetadataServer` in-process:
`POST notice[?action=stop]`, `POST rebalance`, `POST reset`, `POST expire_tokens`,
`POST fail?status=503&count=N` (the next N metadata requests get that status), `GET requests` (the
log of metadata requests: method, path, the headers that matter, status).

    python tests/metadata_server.py --bind 127.0.0.2 --port 8999      # prints its URL when ready
    curl -X POST http://127.0.0.2:8999/_test/notice                   # GCE TRUE + AWS instance-action
"""
from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

GCE_PREEMPTED = "/computeMetadata/v1/instance/preempted"
AWS_TOKEN = "/latest/api/token"
AWS_ACTION = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
LOGGED_HEADERS = ("Metadata-Flavor", TOKEN_HEADER, TTL_HEADER)  # what a test checks the client sent
AWS_NOTICE_S = 120  # AWS gives two minutes between the notice and the interruption


@dataclass(frozen=True)
class Request:
    """One metadata request as the server saw it (test controls are not logged)."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]  # the LOGGED_HEADERS the client sent
    status: int  # 0: the server stopped before answering (a long poll cut short)


def utc_iso(when: datetime) -> str:
    """AWS's format: 2017-09-18T08:22:00Z."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def etag_of(value: str) -> str:
    # content-based, as GCE's: a value that changes and changes back has its old ETag again
    return hashlib.sha256(value.encode()).hexdigest()[:16]


class State:
    """Everything the server answers from, behind one lock; long polls wait on its condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.requests: list[Request] = []
        self.tokens: dict[str, float] = {}  # live token -> monotonic expiry
        self.issued: list[str] = []  # every token ever handed out, in order
        self.long_polls = 0  # GCE wait_for_change requests now blocked
        self.closing = False
        self.reset()

    def reset(self) -> None:
        with self.cond:
            self.preempted = False
            self.action: Optional[dict[str, str]] = None
            self.rebalance: Optional[dict[str, str]] = None
            self.failures: tuple[int, int] = (0, 0)  # (status, how many more requests get it)
            self.etag_prefix = ""  # put before every ETag: a test's odd one ("a b&c"), which GCE could send
            self.cond.notify_all()

    def notice(self, action: str = "terminate") -> None:
        now = datetime.now(timezone.utc)
        with self.cond:
            self.preempted = True
            self.action = {"action": action, "time": utc_iso(now + timedelta(seconds=AWS_NOTICE_S))}
            self.cond.notify_all()

    def raise_rebalance(self) -> None:
        with self.cond:
            self.rebalance = {"noticeTime": utc_iso(datetime.now(timezone.utc))}

    def preempted_text(self) -> str:
        return "TRUE" if self.preempted else "FALSE"

    def etag(self) -> str:
        return self.etag_prefix + etag_of(self.preempted_text())

    def wait_for_change(self, last_etag: str, timeout: Optional[float]) -> bool:
        """Block until the value's ETag differs from `last_etag`, the timeout passes, or the server stops.
        False only when the server is stopping (the client then gets no answer, as from a dying server)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self.long_polls += 1
            try:
                while self.etag() == last_etag and not self.closing:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self.cond.wait(left)
                return not self.closing
            finally:
                self.long_polls -= 1

    def issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(24)
        with self.cond:
            self.tokens[token] = time.monotonic() + ttl
            self.issued.append(token)
        return token

    def token_live(self, token: Optional[str]) -> bool:
        with self.cond:
            return token is not None and self.tokens.get(token, 0.0) > time.monotonic()

    def take_failure(self) -> int:
        """The status a test asked the next requests to get (0: answer normally)."""
        with self.cond:
            status, count = self.failures
            if count <= 0:
                return 0
            self.failures = (status, count - 1)
            return status


class Handler(BaseHTTPRequestHandler):
    server: "_Server"
    server_version = "MetadataStandIn/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is State.requests; stderr lines would only clutter test output

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path.startswith("/_test/"):
            self._control(method, url.path[len("/_test/"):], query)
            return
        status = self.server.state.take_failure()
        if status:
            self._reply(status, "text/plain", f"injected {status}\n")
        elif url.path.startswith("/computeMetadata/"):
            status = self._gce(method, url.path, query)
        elif url.path.startswith("/latest/"):
            status = self._aws(method, url.path)
        else:
            status = self._reply(404, "text/plain", "not found\n")
        headers = {h: self.headers[h] for h in LOGGED_HEADERS if self.headers.get(h) is not None}
        with self.server.state.cond:
            self.server.state.requests.append(Request(method, self.path, headers, status))

    def _reply(self, status: int, content_type: str, body: str, headers: Optional[dict[str, str]] = None) -> int:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        return status

    def _gce(self, method: str, path: str, query: dict[str, str]) -> int:
        state = self.server.state
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._reply(403, "text/html", "Your client does not have permission to get URL "
                               f"{path} from this server. Missing Metadata-Flavor:Google header.\n")
        if method != "GET":
            return self._reply(405, "text/plain", "method not allowed\n")
        if path != GCE_PREEMPTED:
            return self._reply(404, "text/html", "not found\n")
        if query.get("wait_for_change", "").lower() == "true":
            with state.cond:
                last = query.get("last_etag") or state.etag()
            try:
                timeout = float(query["timeout_sec"]) if "timeout_sec" in query else None
            except ValueError:
                return self._reply(400, "text/plain", "timeout_sec must be a number\n")
            if not state.wait_for_change(last, timeout):
                self.close_connection = True
                return 0
        with state.cond:
            value, etag = state.preempted_text(), state.etag()
        return self._reply(200, "application/text", value, {"Metadata-Flavor": "Google", "ETag": etag})

    def _aws(self, method: str, path: str) -> int:
        state = self.server.state
        if path == AWS_TOKEN:
            if method != "PUT":
                return self._reply(405, "text/plain", "method not allowed\n")
            ttl = self.headers.get(TTL_HEADER, "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return self._reply(400, "text/plain", "bad or missing token TTL\n")
            return self._reply(200, "text/plain", state.issue_token(int(ttl)), {TTL_HEADER: ttl})
        if method != "GET":
            return self._reply(405, "text/plain", "method not allowed\n")
        if not state.token_live(self.headers.get(TOKEN_HEADER)):
            return self._reply(401, "text/plain", "unauthorized\n")
        with state.cond:
            body = {AWS_ACTION: state.action, AWS_REBALANCE: state.rebalance}.get(path)
        if body is None:
            return self._reply(404, "text/html", "404 - Not Found\n")
        return self._reply(200, "text/plain", json.dumps(body))

    def _control(self, method: str, name: str, query: dict[str, str]) -> None:
        state = self.server.state
        if method == "GET" and name == "requests":
            with state.cond:
                log = [asdict(r) for r in state.requests]
            self._reply(200, "application/json", json.dumps(log))
            return
        actions = {"notice": lambda: state.notice(query.get("action", "terminate")),
                   "rebalance": state.raise_rebalance, "reset": state.reset, "expire_tokens": state.tokens.clear,
                   "fail": lambda: setattr(state, "failures", (int(query["status"]), int(query.get("count", 1))))}
        if method != "POST" or name not in actions:
            self._reply(404, "text/plain", f"test controls: POST {sorted(actions)}, GET requests\n")
            return
        with state.cond:
            actions[name]()
        self._reply(200, "text/plain", "ok\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a long poll still blocked must not keep a test process alive
    state: State


class MetadataServer:
    """One metadata service on `host:port` (port 0: any free one), served from a thread.

        with MetadataServer("127.0.0.2") as server:
            watcher = NoticeWatcher("gce", server.url, ...)
            server.notice()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = State()
        self._httpd = _Server((host, port), Handler)
        self._httpd.state = self.state
        self.host, self.port = host, self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._serve, name=f"metadata-{host}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _serve(self) -> None:
        self._httpd.serve_forever(poll_interval=0.05)  # stop() waits up to one interval: keep tests quick

    def start(self) -> "MetadataServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the port; blocked long polls end without an answer."""
        with self.state.cond:
            self.state.closing = True
            self.state.cond.notify_all()
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "MetadataServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def notice(self, action: str = "terminate") -> None:
        """A spot/preemption notice: GCE's `preempted` turns TRUE, AWS's instance-action appears."""
        self.state.notice(action)

    def rebalance(self) -> None:
        """AWS's rebalance recommendation (the early 'elevated risk' signal)."""
        self.state.raise_rebalance()

    def reset(self) -> None:
        self.state.reset()

    def expire_tokens(self) -> None:
        """Every AWS token issued so far stops working (GETs with it get 401)."""
        with self.state.cond:
            self.state.tokens.clear()

    def etag_prefix(self, prefix: str) -> None:
        """Every GCE ETag from now on starts with `prefix` (a space, '&', '#': the client must quote it)."""
        with self.state.cond:
            self.state.etag_prefix = prefix

    def fail_next(self, status: int, count: int) -> None:
        """The next `count` metadata requests get `status` (503: the service is having a bad time)."""
        with self.state.cond:
            self.state.failures = (status, count)

    @property
    def requests(self) -> list[Request]:
        with self.state.cond:
            return list(self.state.requests)

    @property
    def tokens_issued(self) -> list[str]:
        """Every AWS token handed out so far, oldest first (expired ones too)."""
        with self.state.cond:
            return list(self.state.issued)

    @property
    def long_polls(self) -> int:
        """GCE wait_for_change requests blocked right now."""
        with self.state.cond:
            return self.state.long_polls


def main() -> None:
    parser = argparse.ArgumentParser(description="A stand-in GCE/AWS metadata service on a local address.")
    parser.add_argument("--bind", default="127.0.0.1", help="address (any 127.x is local on Linux)")
    parser.add_argument("--port", type=int, default=8999)
    args = parser.parse_args()
    server = MetadataServer(args.bind, args.port)
    print(server.url, flush=True)  # the line a test or a script waits for
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
