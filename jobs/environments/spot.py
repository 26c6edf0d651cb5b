"""Spot/preemption notices on cloud VMs: a thread on each VM that watches the metadata service.

GCE gives about 30 s between the notice and power-off, AWS two minutes; the node agent
(`jobs.environments.vms`) starts a `NoticeWatcher` next to torchrun and, on a notice, signals the
ranks so they agree on a step and save together. This module only watches and reports:

- GCE: `GET /computeMetadata/v1/instance/preempted` with `Metadata-Flavor: Google`. One plain read
  first (a notice raised before the watcher started counts), then `?wait_for_change=true` long polls
  with `last_etag` (a change between two requests is not missed) and `timeout_sec` (a silent server
  cannot hold the thread for ever).
- AWS (IMDSv2): a session token from `PUT /latest/api/token`, renewed before it expires and after a
  401; `spot/instance-action` every `poll_s` (AWS suggests 5 s): 404 until a notice, then
  `{"action", "time"}`. The rebalance recommendation (`events/recommendations/rebalance`) is reported
  once, as an early warning of kind "rebalance".

Each kind of notice is reported once. The thread never raises: a service that is down, slow or
answering 5xx is retried with a short backoff, and each kind of error is logged once (logger
"launcher.spot"). Standard library only (no torch): it runs before and beside the ranks.

    python -m jobs.environments.spot --provider gce --url http://127.0.0.2:8999   # notices as JSON lines
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional
from urllib.parse import quote, urlsplit

log = logging.getLogger("launcher.spot")

DEFAULT_URL = "http://169.254.169.254"  # both clouds' link-local metadata address
PROVIDERS = ("gce", "aws")
GCE_PREEMPTED = "/computeMetadata/v1/instance/preempted"
AWS_TOKEN = "/latest/api/token"
AWS_ACTION = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
AWS_POLL_S = 5.0  # AWS's own advice for spot/instance-action
TOKEN_TTL_S = 21600  # IMDSv2's maximum: six hours
LONG_POLL_S = 10  # GCE timeout_sec: how long one wait_for_change may block
REQUEST_TIMEOUT_S = 5.0  # the metadata service is on the VM itself: an answer takes milliseconds
BACKOFF_S = (0.2, 2.0)  # first and largest wait between failed attempts: short, a notice window is 30 s


@dataclass(frozen=True)
class Notice:
    """One notice from the VM's metadata service."""

    provider: str  # "gce" | "aws"
    kind: str  # "preemption" (the VM is going away) | "rebalance" (AWS: at elevated risk of it)
    detail: str  # what the service said, e.g. "terminate at 2025-01-01T00:02:00Z"
    seen_at: float  # time.time() when the watcher saw it


class Unavailable(Exception):
    """The service gave no usable answer (down, timed out, cut off, an unexpected status): try again."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # errors are logged once per kind


@dataclass(frozen=True)
class Response:
    status: int
    body: str
    etag: Optional[str]


class Stopped(Exception):
    """stop() was called while a request was about to start."""


def token_due(obtained_at: float, ttl_s: float, now: float) -> bool:
    """Renew an IMDSv2 token before it expires: a minute early, or halfway through a short TTL."""
    return now >= obtained_at + ttl_s - min(60.0, ttl_s / 2)


def describe_action(body: str) -> str:
    """AWS's instance-action JSON -> "terminate at <time>" (the raw body if it is not that JSON)."""
    try:
        data = json.loads(body)
        return f"{data['action']} at {data['time']}"
    except (ValueError, KeyError, TypeError):
        return body.strip()


def describe_rebalance(body: str) -> str:
    try:
        return f"rebalance recommended at {json.loads(body)['noticeTime']}"
    except (ValueError, KeyError, TypeError):
        return body.strip()


class NoticeWatcher:
    """Watches one VM's metadata service in a daemon thread; `on_notice` runs in that thread."""

    def __init__(self, provider: str, base_url: Optional[str] = None, poll_s: float = AWS_POLL_S,
                 on_notice: Optional[Callable[[Notice], None]] = None, *, long_poll_s: int = LONG_POLL_S,
                 token_ttl_s: int = TOKEN_TTL_S, on_error: Optional[Callable[[str], None]] = None) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider {provider!r}: use one of {', '.join(PROVIDERS)}")
        url = urlsplit(base_url or DEFAULT_URL)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{base_url!r} is not an http(s) URL")
        if poll_s <= 0 or long_poll_s < 1 or token_ttl_s < 1:
            raise ValueError("poll_s, long_poll_s and token_ttl_s must be positive")
        self.provider, self.base_url, self.poll_s = provider, (base_url or DEFAULT_URL).rstrip("/"), poll_s
        self.long_poll_s, self.token_ttl_s = int(long_poll_s), int(token_ttl_s)
        self._on_notice = on_notice
        self._on_error = on_error  # each kind of error once: a watcher that cannot watch must be seen (a rank log)
        self._address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
        self._https = url.scheme == "https"
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards _conn between the watcher thread and stop()
        self._conn: Optional[http.client.HTTPConnection] = None
        self._fired: set[str] = set()
        self._logged: set[str] = set()
        self._etag: Optional[str] = None
        self._gce_read = False  # GCE: the first plain read has been answered
        self._token: Optional[str] = None
        self._token_at = 0.0
        self._thread = threading.Thread(target=self._run, name=f"spot-{provider}", daemon=True)

    def start(self) -> "NoticeWatcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """End the watch, cutting short a request in flight (a GCE long poll); True once the thread ended."""
        self._stop.set()
        with self._lock:
            if self._conn is not None and self._conn.sock is not None:
                try:
                    self._conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading it
                except OSError:
                    pass
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        """Still watching: False after stop(), and after a preemption notice (nothing is left to watch)."""
        return self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        step = self._gce_step if self.provider == "gce" else self._aws_step
        backoff = BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                wait = step()
                backoff = BACKOFF_S[0]
            except Stopped:
                return
            except Unavailable as e:
                wait, backoff = backoff, min(2 * backoff, BACKOFF_S[1])
                if not self._stop.is_set():  # a request cut short by stop() is no error
                    self._log_once(e.kind, f"{e}")
            except Exception as e:  # never out of the thread: the ranks must not lose their watcher to a surprise
                wait, backoff = backoff, min(2 * backoff, BACKOFF_S[1])
                self._log_once(type(e).__name__, f"unexpected {type(e).__name__}: {e}")
            if wait is None:
                return
            self._stop.wait(wait)

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("spot notices (%s, %s): %s; retrying (not logged again: %s)",
                        self.provider, self.base_url, message, kind)
            if self._on_error is not None:
                try:
                    self._on_error(f"WARNING: spot/preemption notices from {self.base_url} ({self.provider}) cannot "
                                   f"be read: {message}; a preemption may go unseen while this lasts (retrying)")
                except Exception:  # the report's failure must not end the watch
                    log.exception("spot watcher error callback failed")

    def _fire(self, kind: str, detail: str) -> None:
        if kind in self._fired:
            return
        self._fired.add(kind)
        notice = Notice(self.provider, kind, detail, time.time())
        log.warning("%s notice from %s: %s", kind, self.provider, detail)
        if self._on_notice is None:
            return
        try:
            self._on_notice(notice)
        except Exception:  # the callback's failure is the caller's bug; the watch itself goes on
            log.exception("spot notice callback failed")

    def _gce_step(self) -> Optional[float]:
        """One read of `preempted`; None once it is TRUE (the watch is over), else 0 (read again at once)."""
        path, timeout = GCE_PREEMPTED, REQUEST_TIMEOUT_S
        if self._gce_read:
            path += f"?wait_for_change=true&timeout_sec={self.long_poll_s}"
            # quoted: the ETag is the server's text, and one with a space or a '&' would break every later poll
            path += f"&last_etag={quote(self._etag, safe='')}" if self._etag else ""
            timeout += self.long_poll_s
        resp = self._request("GET", path, {"Metadata-Flavor": "Google"}, timeout)
        if resp.status != 200:
            raise Unavailable(f"HTTP {resp.status}", f"GET {self.base_url}{GCE_PREEMPTED}: HTTP {resp.status}")
        self._gce_read, self._etag = True, resp.etag
        if resp.body.strip().upper() == "TRUE":
            self._fire("preemption", "preempted: TRUE")
            return None
        return 0.0

    def _aws_step(self) -> Optional[float]:
        """One poll of the rebalance recommendation (until seen) and of instance-action."""
        if "rebalance" not in self._fired:
            resp = self._aws_get(AWS_REBALANCE)
            if resp.status == 200:
                self._fire("rebalance", describe_rebalance(resp.body))
        resp = self._aws_get(AWS_ACTION)
        if resp.status == 200:
            self._fire("preemption", describe_action(resp.body))
            return None
        return self.poll_s

    def _aws_get(self, path: str) -> Response:
        """GET with the session token; a 401 (expired or revoked token) gets one retry with a new one.
        Returns 200 and 404 answers (404: nothing announced); anything else raises Unavailable."""
        resp = self._request("GET", path, {TOKEN_HEADER: self._aws_token()})
        if resp.status == 401:
            self._token = None
            resp = self._request("GET", path, {TOKEN_HEADER: self._aws_token()})
        if resp.status not in (200, 404):
            raise Unavailable(f"HTTP {resp.status}", f"GET {self.base_url}{path}: HTTP {resp.status}")
        return resp

    def _aws_token(self) -> str:
        now = time.monotonic()
        if self._token is None or token_due(self._token_at, self.token_ttl_s, now):
            resp = self._request("PUT", AWS_TOKEN, {TTL_HEADER: str(self.token_ttl_s)})
            if resp.status != 200:
                raise Unavailable(f"token HTTP {resp.status}", f"PUT {self.base_url}{AWS_TOKEN}: HTTP {resp.status}")
            self._token, self._token_at = resp.body.strip(), now
        return self._token

    def _request(self, method: str, path: str, headers: dict[str, str], timeout: float = REQUEST_TIMEOUT_S) -> Response:
        # http.client, not urllib.request: urllib would send these through an HTTP(S)_PROXY from the
        # environment, and a proxy must never answer for the VM's own metadata service.
        conn_class = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = conn_class(*self._address, timeout=timeout)
        try:
            conn.connect()
            with self._lock:  # stop() sets the event before it takes the lock: it either sees conn or we see it
                if self._stop.is_set():
                    raise Stopped()
                self._conn = conn
            conn.request(method, path, headers=headers)
            answer = conn.getresponse()
            return Response(answer.status, answer.read().decode(errors="replace"), answer.getheader("ETag"))
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable(type(e).__name__, f"{method} {self.base_url}{path}: {type(e).__name__}: {e}") from None
        finally:
            with self._lock:
                self._conn = None
            conn.close()


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.environments.spot",
                                     description="Print a VM's spot/preemption notices as JSON lines.")
    parser.add_argument("--provider", choices=PROVIDERS, required=True)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"metadata service (default {DEFAULT_URL})")
    parser.add_argument("--poll-s", type=_positive, default=AWS_POLL_S, help="AWS: seconds between polls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    def emit(notice: Notice) -> None:
        print(json.dumps(asdict(notice)), flush=True)

    try:
        watcher = NoticeWatcher(args.provider, args.url, args.poll_s, emit)
    except ValueError as e:
        parser.error(str(e))
    watcher.start()
    try:
        while watcher.is_alive():  # ends after the preemption notice
            watcher.join(0.5)
    except KeyboardInterrupt:
        watcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
