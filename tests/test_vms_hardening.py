"""The VM backend's edges, without VMs (issue 23): what the code sync copies, node 0's known_hosts, the setup
script, what comes back from a VM, a slow or hung hosts_command, a node 0 that stops answering, and the schema's
host and env checks. Each test here runs in well under a few seconds; the one that needs sshd is in
test_vms_ssh.py (the SSH folder on node 0)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import user_cli
from launcher.backends import vms as backend
from launcher.vms import checks, layout, ssh
from launcher.vms.hosts import hosts_from_command
from launcher.vms.remote_output import LOG_MARK, json_object, last_json_object, marked_log
from launcher.vms.ssh import Completed, HostError, HostSpec
from launcher.vms.sync import code_to_copy, known_hosts_for, select, user_patterns
from jobs.schema.errors import ConfigError
from jobs.schema.vms import VmsConfig

SRC = "cluster config test"
CFG = VmsConfig(hosts=("127.0.0.2",), python="/usr/bin/python3")


def one_line(exc: pytest.ExceptionInfo) -> str:
    lines = str(exc.value).splitlines()
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  HINT: ")), lines
    return lines[0]


# ------------------------------------------------------------------------------------------ point 4: the code sync
def test_sync_leaves_out_keys_secrets_runs_and_what_the_user_excludes(tmp_path: Path) -> None:
    code = tmp_path / "code"
    wanted = ["train.py", "pkg/model.py", "conf/a.yaml", "notes/keep.key", "keys/public.txt"]
    unwanted = ["id_rsa", "id_rsa.pub", "id_ed25519", "keys/id_ecdsa", "server.pem", "tls.key", "cert.p12",
                "secrets.yaml", "runs/old/secrets.yaml", "runs/old/ckpt.pt", "myruns/r/run.json", ".ssh/config",
                ".env", ".git/config", "pkg/__pycache__/m.cpython-311.pyc", "data/train.bin", "big.csv",
                "sub/out.csv"]
    for rel in wanted + unwanted:
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text("x")
    (code / ".launcherignore").write_text("# data lives in the bucket\ndata/\n\n!notes/keep.key\n")
    cfg = replace(CFG, sync_exclude=("*.csv",))
    picked = select(code, "user", user_patterns(cfg, code, code / "myruns"))
    assert sorted(rel for _, rel in picked) == sorted(f"user/{rel}" for rel in wanted)


def test_code_over_the_cap_is_refused_naming_the_biggest_files(tmp_path: Path) -> None:
    """Unit level: the error names the biggest files and how to leave them out."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text("print()\n")
    for name, mb in (("weights.bin", 70), ("extra.bin", 40), ("small.txt", 0)):
        with open(code / name, "wb") as f:
            f.truncate(mb << 20)  # sparse: costs no disk
    with pytest.raises(ConfigError) as exc:
        code_to_copy(CFG, str(code), None, SRC)
    line = one_line(exc)
    assert "vms.sync_max_mb" in line and "over 100 MB" in line and "user/weights.bin (70.0 MB)" in line, line
    assert "user/extra.bin (40.0 MB)" in line and ".launcherignore" in str(exc.value)
    (code / ".launcherignore").write_text("*.bin\n")
    assert sorted(rel for _, rel in code_to_copy(CFG, str(code), None, SRC) if rel.startswith("user/")) == \
        ["user/small.txt", "user/train.py"]


def test_launch_of_too_much_code_exits_2_before_anything_starts(tmp_path: Path) -> None:
    """Through the CLI with the default cap (100 MB): one error line, nothing written; the host (nothing listens
    there) is never asked."""
    project, runs = tmp_path / "project", tmp_path / "runs"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    with open(project / "dataset.npy", "wb") as f:
        f.truncate(150 << 20)
    cluster = tmp_path / "vms.yaml"
    cluster.write_text("backend: vms\nvms:\n  hosts: [127.0.0.9]\n  port: 1\n  python: /usr/bin/python3\n")
    proc = user_cli(project, "run", "train.py", "--cluster", str(cluster), "--runs-dir", str(runs), timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) <= 2 and "user/dataset.npy (150.0 MB)" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (runs.exists() and any(runs.iterdir()))


def _hashed(name: str) -> str:
    salt = b"0123456789abcdefghij"
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def test_node_0_gets_only_the_known_hosts_lines_of_the_runs_hosts() -> None:
    text = "\n".join(["# mine", "10.0.0.5 ssh-ed25519 AAAAplain", "bank.example.com ssh-ed25519 AAAAother",
                      "[10.0.0.6]:2222 ssh-ed25519 AAAAport", f"{_hashed('10.0.0.7')} ssh-ed25519 AAAAhashed",
                      f"{_hashed('secret.example.com')} ssh-ed25519 AAAAhashedother",
                      "10.128.* ssh-ed25519 AAAAwild", "@cert-authority *.corp ssh-ed25519 AAAAca",
                      "|1|broken ssh-rsa AAAA", "", "garbage"])
    kept = known_hosts_for(text, ["10.0.0.5", "10.0.0.6", "10.0.0.7"], 2222)
    assert [line.split()[-1] for line in kept.splitlines()] == ["AAAAplain", "AAAAport", "AAAAhashed"]
    with_patterns = known_hosts_for(text, ["10.0.0.5"], 22, keep_patterns=True)
    assert [line.split()[-1] for line in with_patterns.splitlines()] == ["AAAAplain", "AAAAwild", "AAAAca"]


# ------------------------------------------------------------------------------------------ point 8: setup lines
def _bash(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)


def test_setup_lines_with_a_comment_or_a_trailing_semicolon_start_the_agent(tmp_path: Path) -> None:
    """The agent's script run by bash here, with `echo` for the interpreter: it must get past the setup lines."""
    (tmp_path / "h" / "code" / "launcher").mkdir(parents=True)
    cfg = replace(CFG, setup=("echo one  # activate the venv", "echo two;", "export X=3 # why"), python="echo",
                  remote_dir=str(tmp_path / "h"))
    done = _bash(layout.agent_command(cfg, "r", "127.0.0.2", 1, 1, "127.0.0.2:29400", "id"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["one", "two"] and lines[2].startswith("-u -m jobs.environments.vms --nnodes 1"), lines
    probe = _bash(checks.probe_command(cfg))  # the pre-launch probe runs the same setup script
    assert probe.returncode == 0 and probe.stdout.splitlines()[:2] == ["one", "two"] and "-c" in probe.stdout


def test_a_failing_setup_line_stops_the_script_and_is_named(tmp_path: Path) -> None:
    (tmp_path / "h" / "code" / "launcher").mkdir(parents=True)
    cfg = replace(CFG, setup=("true", "false  # fails", "echo never"), python="echo", remote_dir=str(tmp_path / "h"))
    for script in (layout.agent_command(cfg, "r", "127.0.0.2", 1, 1, "127.0.0.2:29400", "id"),
                   layout.supervisor_command(cfg, "r", "127.0.0.2"), checks.probe_command(cfg)):
        done = _bash(script)
        assert done.returncode == 1 and "never" not in done.stdout and "-u" not in done.stdout, done.stdout
        assert "vms.setup line 2 failed (exit status 1)" in done.stderr


# ------------------------------------------------------------------------------------------ point 7: VM output
@pytest.mark.parametrize("stdout", ["", "\n\n", "Welcome to Ubuntu\n", "[1, 2]", "{not json", "[" * 200_000,
                                    "null", "\x00\xff binary"])
def test_bad_answers_from_node_0_are_one_line_naming_the_host(stdout: str) -> None:
    for read in (lambda: last_json_object("root@10.0.0.5:22", "status of run r", stdout),
                 lambda: json_object("10.0.0.5", "run.json", stdout)):
        with pytest.raises(HostError) as exc:
            read()
        line = one_line(exc)
        assert "10.0.0.5" in line and len(line) < 300, line


def test_a_login_banner_before_the_answer_is_skipped() -> None:
    assert last_json_object("h", "status", 'Welcome!\n{"a": [1\n{"info": {}}\n') == {"info": {}}
    assert marked_log("h", f"Last login: today\n{LOG_MARK}1700000000\nstep 1\nstep 2\n") == (1700000000,
                                                                                              "step 1\nstep 2\n")
    assert marked_log("h", "no such log") is None
    with pytest.raises(HostError, match="h: the log's modification time came back as 'stat: bad'"):
        marked_log("h", f"{LOG_MARK}stat: bad\ntext")


def test_a_connection_lost_mid_command_is_one_line() -> None:
    import asyncio

    import asyncssh

    class Lost:
        async def run(self, *_: object, **__: object) -> None:
            raise asyncssh.ChannelOpenError(2, "SSH connection closed")

        def get_extra_info(self, *_: object) -> tuple:
            return ("10.0.0.5", 22)

    with pytest.raises(HostError) as exc:
        asyncio.run(ssh.run(Lost(), "cat run.json"))  # type: ignore[arg-type]
    assert one_line(exc).startswith("10.0.0.5: the SSH connection was lost while running 'cat run.json'")


def test_a_probe_report_without_its_fields_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    async def answer(*_: object, **__: object) -> Completed:
        return Completed(0, 'motd\nLAUNCHER-HOST-FACTS {"python": "3.11"}\n', "")

    monkeypatch.setattr(checks.ssh, "run", answer)
    with pytest.raises(HostError) as exc:
        asyncio.run(checks.probe(HostSpec("10.0.0.5"), CFG))
    assert one_line(exc).startswith("10.0.0.5: the interpreter's report lacks its fields")


# ------------------------------------------------------------------------------------------ point 6: hangs
def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


def test_a_timed_out_hosts_command_takes_its_children_with_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "child"
    started = time.monotonic()
    with pytest.raises(ConfigError) as exc:
        hosts_from_command(f"sleep 30 & echo $! > {pid_file}; wait", SRC, timeout_s=1)
    assert time.monotonic() - started < 10 and "did not finish within 1 s (timed out" in one_line(exc)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), f"the hosts_command's child {child} still runs"


def test_doctor_bounds_a_slow_hosts_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.schema import ClusterConfig

    monkeypatch.setattr(checks, "CHECK_TIMEOUT_S", 1.0)
    cluster = ClusterConfig(name="c", backend="vms", vms=VmsConfig(hosts_command="sleep 20; echo 10.0.0.5"))
    started = time.monotonic()
    found = checks.doctor_checks(cluster)
    assert time.monotonic() - started < 8
    assert len(found) == 1 and found[0].ok is False and "timed out" in found[0].detail, found


def test_launch_wait_gives_up_on_an_unreachable_node_0(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Nothing listens at 127.0.0.9:1: after vms.host_wait_s the wait ends with "unknown" and says how to look
    again, instead of polling forever."""
    run_dir = tmp_path / "runs" / "lost"
    run_dir.mkdir(parents=True)
    (run_dir / "cluster.yaml").write_text("name: c\nbackend: vms\nvms:\n  hosts: [127.0.0.9]\n  port: 1\n  host_wait_s: 1\n"
                                          "  connect_timeout_s: 2\n  known_hosts: ignore\n")
    (run_dir / "run.json").write_text(json.dumps({"run_id": "abc", "state": "submitted", "vm_head": "127.0.0.9",
                                                  "vm_run_dir": "~/launcher/runs/lost", "hosts": ["127.0.0.9"]}))
    from jobs.schema.run_dir import Run

    out: dict = {}
    waiter = threading.Thread(target=lambda: out.update(backend.wait([Run.at(run_dir)], poll_s=0.2)), daemon=True)
    waiter.start()
    waiter.join(20)
    assert not waiter.is_alive(), "launch --wait still polls an unreachable node 0"
    assert out == {"lost": "unknown"}
    assert "launcher status lost" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ point 10: the schema
@pytest.mark.parametrize("changes, key", [
    ({"hosts": ("127.0.0.9;touch${IFS}/x",)}, "vms.hosts[0]"),
    ({"hosts": ("10.0.0.5", "$(id)")}, "vms.hosts[1]"),
    ({"hosts": ("a b",)}, "vms.hosts[0]"),
    ({"env": {"A=B": "1"}}, "vms.env"),
    ({"env": {"": "1"}}, "vms.env"),
    ({"env": {"1X": "1"}}, "vms.env"),
    ({"env": {"X": "a\0b"}}, "vms.env.X"),
    ({"sync_exclude": ("",)}, "vms.sync_exclude[0]"),
    ({"sync_max_mb": 0}, "vms.sync_max_mb"),
    ({"setup": ("source a.sh \\",)}, "vms.setup[0]"),
])
def test_bad_vms_values_are_refused_at_load(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        replace(CFG, **changes).check(SRC)
    assert one_line(exc).startswith(f"{SRC}: {key}: ")


@pytest.mark.parametrize("host", ["10.0.0.5", "::1", "fe80::1%eth0", "vm-1.us-central1-a.c.project.internal",
                                  "node_2"])
def test_host_names_and_addresses_pass(host: str) -> None:
    replace(CFG, hosts=(host,), env={"HF_HOME": "/data", "_X1": "y"}).check(SRC)
