"""Spot notice watcher against real metadata servers on loopback addresses (tests/metadata_server.py).

Each "host" is its own loopback address (127.0.0.2, 127.0.0.3); the watchers are real threads
making real HTTP requests. Waits are for events (a callback, a request in the server's log), never
a sleep that guesses how long something takes.
"""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import pytest

from conftest import REPO, user_env, wait_until
from jobs.environments.spot import (AWS_ACTION, AWS_REBALANCE, AWS_TOKEN, GCE_PREEMPTED, TOKEN_HEADER, TTL_HEADER,
                                    Notice, NoticeWatcher, token_due)
from metadata_server import MetadataServer

HOST_A, HOST_B = "127.0.0.2", "127.0.0.3"
WAIT_S = 15  # a deadline for events that take milliseconds: only a broken watcher reaches it


class Collected:
    """An on_notice callback that keeps what it was given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notices: list[Notice] = []

    def __call__(self, notice: Notice) -> None:
        with self._lock:
            self._notices.append(notice)

    @property
    def notices(self) -> list[Notice]:
        with self._lock:
            return list(self._notices)

    def kinds(self) -> list[str]:
        return [n.kind for n in self.notices]


@pytest.fixture
def server() -> Iterator[MetadataServer]:
    with MetadataServer(HOST_A) as srv:
        yield srv


@pytest.fixture
def watchers() -> Iterator[list[NoticeWatcher]]:
    """Watchers a test appends here are stopped at its end, pass or fail."""
    started: list[NoticeWatcher] = []
    yield started
    for watcher in started:
        watcher.stop()


def watch(watchers: list[NoticeWatcher], provider: str, url: str, **kwargs: object) -> tuple[NoticeWatcher, Collected]:
    got = Collected()
    watcher = NoticeWatcher(provider, url, on_notice=got, **kwargs)  # type: ignore[arg-type]
    watchers.append(watcher)
    return watcher.start(), got


def answered(srv: MetadataServer, path: str, status: Optional[int] = None) -> int:
    """How many requests for `path` the server has answered (with `status`, if given)."""
    return sum(1 for r in srv.requests if r.path.split("?")[0] == path and status in (None, r.status))


def settle(srv: MetadataServer, watcher: NoticeWatcher, path: str) -> None:
    """Wait until the watcher has ended or has polled `path` three more times: a watcher that would
    report a notice twice has had the chance to."""
    seen = answered(srv, path)
    wait_until(lambda: not watcher.is_alive() or answered(srv, path) >= seen + 3, "more polls or the watcher's end",
               timeout=WAIT_S, poll=0.02)


def spot_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "launcher.spot" and r.levelno == logging.WARNING
            and "notice from" not in r.getMessage()]


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def test_gce_notice_after_start_fires_once_and_every_request_says_metadata_flavor(
        server: MetadataServer, watchers: list[NoticeWatcher]) -> None:
    watcher, got = watch(watchers, "gce", server.url, long_poll_s=60)
    wait_until(lambda: server.long_polls >= 1, "the watcher's wait_for_change long poll", timeout=WAIT_S, poll=0.02)
    server.notice()
    wait_until(lambda: got.notices, "the GCE notice", timeout=WAIT_S, poll=0.02)
    settle(server, watcher, GCE_PREEMPTED)
    assert [(n.provider, n.kind) for n in got.notices] == [("gce", "preemption")]
    requests = server.requests
    assert requests and all(r.headers.get("Metadata-Flavor") == "Google" for r in requests), requests
    assert all(r.status == 200 for r in requests), requests  # 403: a request without the header
    assert "wait_for_change=true" not in requests[0].path  # a plain read first, then long polls
    assert any("wait_for_change=true" in r.path and "timeout_sec=60" in r.path for r in requests), requests


def test_gce_notice_raised_before_start_counts(server: MetadataServer, watchers: list[NoticeWatcher]) -> None:
    server.notice()
    # long_poll_s=60: a watcher that only long-polls would wait a minute for a change that already happened
    watcher, got = watch(watchers, "gce", server.url, long_poll_s=60)
    wait_until(lambda: got.notices, "the notice raised before the watcher started", timeout=WAIT_S, poll=0.02)
    settle(server, watcher, GCE_PREEMPTED)
    assert got.kinds() == ["preemption"]


def test_aws_token_then_polls_then_one_notice_with_action_and_time(
        server: MetadataServer, watchers: list[NoticeWatcher]) -> None:
    watcher, got = watch(watchers, "aws", server.url, poll_s=0.1)
    wait_until(lambda: answered(server, AWS_ACTION, 404) >= 3, "three polls before the notice", timeout=WAIT_S,
               poll=0.02)
    assert got.notices == []  # 404 is "no notice", not one
    server.notice("stop")
    wait_until(lambda: got.notices, "the AWS notice", timeout=WAIT_S, poll=0.02)
    settle(server, watcher, AWS_ACTION)
    [notice] = got.notices
    assert (notice.provider, notice.kind) == ("aws", "preemption")
    assert server.state.action is not None
    assert notice.detail == f"stop at {server.state.action['time']}"
    requests = server.requests
    assert (requests[0].method, requests[0].path, requests[0].headers.get(TTL_HEADER)) == ("PUT", AWS_TOKEN, "21600")
    gets = [r for r in requests if r.method == "GET"]
    assert gets and all(r.headers.get(TOKEN_HEADER) == server.tokens_issued[0] for r in gets), gets
    assert len(server.tokens_issued) == 1  # one six-hour token for the whole watch, not one per poll
    assert all(r.status in (200, 404) for r in requests), requests  # 401: a GET without the token


def test_aws_token_expired_by_the_server_is_renewed(server: MetadataServer, watchers: list[NoticeWatcher]) -> None:
    watcher, got = watch(watchers, "aws", server.url, poll_s=0.1)
    wait_until(lambda: answered(server, AWS_ACTION, 404) >= 2, "polls with the first token", timeout=WAIT_S, poll=0.02)
    server.expire_tokens()  # as when the instance's metadata service restarts
    wait_until(lambda: answered(server, AWS_TOKEN) >= 2, "a second token", timeout=WAIT_S, poll=0.02)
    server.notice()
    wait_until(lambda: got.notices, "the notice after the token was renewed", timeout=WAIT_S, poll=0.02)
    settle(server, watcher, AWS_ACTION)
    assert got.kinds() == ["preemption"]
    seen = [r for r in server.requests if r.path == AWS_ACTION and r.status == 200]
    assert seen[0].headers[TOKEN_HEADER] == server.tokens_issued[-1]


def test_aws_rebalance_recommendation_comes_first_and_once(
        server: MetadataServer, watchers: list[NoticeWatcher]) -> None:
    watcher, got = watch(watchers, "aws", server.url, poll_s=0.1)
    wait_until(lambda: answered(server, AWS_REBALANCE, 404) >= 2, "rebalance polls", timeout=WAIT_S, poll=0.02)
    server.rebalance()
    wait_until(lambda: got.notices, "the rebalance recommendation", timeout=WAIT_S, poll=0.02)
    settle(server, watcher, AWS_ACTION)
    assert got.kinds() == ["rebalance"]  # an early warning, reported once, and the watch goes on
    assert watcher.is_alive()
    assert server.state.rebalance is not None and server.state.rebalance["noticeTime"] in got.notices[0].detail
    server.notice()
    wait_until(lambda: len(got.notices) == 2, "the preemption notice after the rebalance", timeout=WAIT_S, poll=0.02)
    settle(server, watcher, AWS_ACTION)
    assert got.kinds() == ["rebalance", "preemption"]


def test_a_notice_on_one_host_reaches_that_hosts_watcher_only(watchers: list[NoticeWatcher]) -> None:
    # one port on two addresses, as a cluster config's metadata_url "http://{host}:PORT" gives
    with MetadataServer(HOST_A) as a, MetadataServer(HOST_B, a.port) as b:
        watch_a, got_a = watch(watchers, "aws", a.url, poll_s=0.1)
        watch_b, got_b = watch(watchers, "aws", b.url, poll_s=0.1)
        wait_until(lambda: answered(a, AWS_ACTION) >= 2 and answered(b, AWS_ACTION) >= 2, "both watchers polling",
                   timeout=WAIT_S, poll=0.02)
        a.notice()
        wait_until(lambda: got_a.notices, "host A's notice", timeout=WAIT_S, poll=0.02)
        settle(b, watch_b, AWS_ACTION)
        assert got_a.kinds() == ["preemption"]
        assert got_b.notices == [] and watch_b.is_alive()


def test_server_down_at_start_then_up(watchers: list[NoticeWatcher], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="launcher.spot")
    port = free_port(HOST_B)
    watcher, got = watch(watchers, "aws", f"http://{HOST_B}:{port}", poll_s=0.1)
    wait_until(lambda: spot_warnings(caplog), "the watcher to report the refused connection", timeout=WAIT_S,
               poll=0.02)
    with MetadataServer(HOST_B, port) as server:
        server.notice()
        wait_until(lambda: got.notices, "the notice once the service is up", timeout=WAIT_S, poll=0.02)
    assert got.kinds() == ["preemption"]
    assert len(spot_warnings(caplog)) == 1, spot_warnings(caplog)


def test_5xx_answers_are_retried_and_logged_once(server: MetadataServer, watchers: list[NoticeWatcher],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="launcher.spot")
    server.fail_next(503, 3)
    watcher, got = watch(watchers, "gce", server.url, long_poll_s=60)
    wait_until(lambda: server.long_polls >= 1, "the long poll after three 503s", timeout=WAIT_S, poll=0.02)
    server.notice()
    wait_until(lambda: got.notices, "the notice after the 503s", timeout=WAIT_S, poll=0.02)
    assert answered(server, GCE_PREEMPTED, 503) == 3
    warnings = spot_warnings(caplog)
    assert len(warnings) == 1 and "503" in warnings[0], warnings


@pytest.mark.parametrize("etag", ["a b", "x&last_etag=y#z", "\u00e9/+%20"])
def test_gce_etag_with_odd_characters_is_quoted_and_the_notice_seen(server: MetadataServer, etag: str,
                                                                    watchers: list[NoticeWatcher]) -> None:
    """GCE's ETag is the server's text: sent back unquoted, a space made every long poll fail (issue 23)."""
    server.etag_prefix(etag)
    watcher, got = watch(watchers, "gce", server.url, long_poll_s=60)
    wait_until(lambda: server.long_polls >= 1, "a long poll with the odd ETag", timeout=WAIT_S, poll=0.02)
    server.notice()
    wait_until(lambda: got.notices, "the notice", timeout=WAIT_S, poll=0.02)
    assert got.kinds() == ["preemption"]
    assert all(r.status == 200 for r in server.requests), server.requests


def test_a_failing_watcher_says_so_once_through_on_error(server: MetadataServer, watchers: list[NoticeWatcher]) -> None:
    """As loud as a missing watcher: the agent writes on_error's line into rank 0's log, once per kind."""
    said: list[str] = []
    server.fail_next(503, 3)  # backoff 0.2 + 0.4 + 0.8 s
    watcher = NoticeWatcher("gce", server.url, on_notice=Collected(), long_poll_s=60, on_error=said.append)
    watchers.append(watcher.start())
    wait_until(lambda: server.long_polls >= 1, "the long poll after three 503s", timeout=WAIT_S, poll=0.02)
    assert len(said) == 1 and said[0].startswith("WARNING: ") and server.url in said[0] and "503" in said[0], said


@pytest.mark.parametrize("provider", ["gce", "aws"])
def test_stop_ends_the_thread_mid_wait(server: MetadataServer, provider: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="launcher.spot")
    # a minute-long GCE long poll and a minute between AWS polls: stop() must cut either short
    watcher, _ = watch([], provider, server.url, poll_s=60, long_poll_s=60)
    if provider == "gce":
        wait_until(lambda: server.long_polls >= 1, "the long poll", timeout=WAIT_S, poll=0.02)
    else:
        wait_until(lambda: answered(server, AWS_ACTION) >= 1, "the first poll", timeout=WAIT_S, poll=0.02)
    assert watcher.stop(timeout=WAIT_S)
    assert not watcher.is_alive()
    assert spot_warnings(caplog) == []  # a request cut short by stop() is no error


def test_token_renewed_before_it_expires() -> None:
    assert not token_due(obtained_at=0.0, ttl_s=21600, now=21539.0)
    assert token_due(obtained_at=0.0, ttl_s=21600, now=21540.0)  # a minute early
    assert not token_due(obtained_at=100.0, ttl_s=10, now=104.9)
    assert token_due(obtained_at=100.0, ttl_s=10, now=105.0)  # a short TTL: halfway


def fetch(url: str, method: str = "GET", headers: Optional[dict[str, str]] = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as answer:
            return answer.status, answer.read().decode(), dict(answer.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_stand_in_server_keeps_the_clouds_rules(server: MetadataServer) -> None:
    """The stand-in is only worth testing against if it refuses what the real services refuse."""
    gce = server.url + GCE_PREEMPTED
    assert fetch(gce)[0] == 403
    status, body, headers = fetch(gce, headers={"Metadata-Flavor": "Google"})
    assert (status, body) == (200, "FALSE") and headers["ETag"]
    stale = fetch(gce + "?wait_for_change=true&last_etag=0000", headers={"Metadata-Flavor": "Google"})
    assert stale[:2] == (200, "FALSE")  # a different ETag than the current one: answered at once
    timed_out = fetch(gce + "?wait_for_change=true&timeout_sec=1", headers={"Metadata-Flavor": "Google"})
    assert timed_out[:2] == (200, "FALSE")  # nothing changed within timeout_sec: the current value
    action = server.url + AWS_ACTION
    assert fetch(action)[0] == 401
    assert fetch(server.url + AWS_TOKEN, "PUT")[0] == 400
    assert fetch(server.url + AWS_TOKEN, "PUT", {TTL_HEADER: "21601"})[0] == 400
    status, token, _ = fetch(server.url + AWS_TOKEN, "PUT", {TTL_HEADER: "60"})
    assert status == 200 and token
    assert fetch(action, headers={TOKEN_HEADER: token + "x"})[0] == 401
    assert fetch(action, headers={TOKEN_HEADER: token})[0] == 404
    fetch(server.url + "/_test/notice", "POST")
    status, body, _ = fetch(action, headers={TOKEN_HEADER: token})
    notice = json.loads(body)
    assert status == 200 and notice["action"] == "terminate"
    when = datetime.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert when.timestamp() > time.time() + 60  # two minutes ahead, as AWS gives
    assert fetch(gce, headers={"Metadata-Flavor": "Google"})[1] == "TRUE"


def test_command_lines_print_the_notice_as_json() -> None:
    """Both scripts as a person runs them: the stand-in server, then the watcher printing JSON lines."""
    port = free_port(HOST_B)
    srv = subprocess.Popen([sys.executable, "tests/metadata_server.py", "--bind", HOST_B, "--port", str(port)],
                           cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == f"http://{HOST_B}:{port}"
        fetch(f"http://{HOST_B}:{port}/_test/notice", "POST")
        out = subprocess.run([sys.executable, "-m", "jobs.environments.spot", "--provider", "gce", "--url",
                              f"http://{HOST_B}:{port}"], cwd=REPO, env=user_env(), capture_output=True, text=True,
                             timeout=60)
    finally:
        srv.terminate()
        srv.wait(timeout=WAIT_S)
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.splitlines()
    assert {k: v for k, v in json.loads(line).items() if k != "seen_at"} == {
        "provider": "gce", "kind": "preemption", "detail": "preempted: TRUE"}
    bad = subprocess.run([sys.executable, "-m", "jobs.environments.spot", "--provider", "gce", "--url", "ftp://x"],
                         cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not an http(s) URL" in bad.stderr and bad.stdout == ""


def test_the_node_agent_writes_a_failing_watchers_warning_into_rank_0s_log(tmp_path: Path) -> None:
    """A watcher that cannot reach its metadata service is as loud as a missing one: one WARNING line in the
    log `launcher logs RUN` shows, naming the endpoint and the error, however many polls fail."""
    from jobs.environments.vms import Agent

    url = f"http://{HOST_B}:{free_port(HOST_B)}"  # nothing listens there
    watcher = Agent(tmp_path, HOST_B, 1).watch("aws", url, 0.05)
    try:
        log = tmp_path / "logs" / "rank0.log"
        wait_until(lambda: log.exists() and "WARNING" in log.read_text(), "the warning in rank 0's log",
                   timeout=WAIT_S, poll=0.02)
        time.sleep(0.5)  # ten more failed polls: still one line
    finally:
        watcher.stop()
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and url in lines[0] and "ConnectionRefusedError" in lines[0], lines
