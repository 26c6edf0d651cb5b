"""The VM backend's SSH layer, host list and pre-launch checks, against a real sshd on loopback addresses
(the `vm_hosts` fixture: scripts/vms_local.sh), each "host" 127.0.0.x with its own folder."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_cli
from launcher.vms import ssh
from launcher.vms.checks import HostFacts, check_hosts, check_recipe_on_vms, compare_hosts, release
from launcher.vms.hosts import launch_size, resize_line, resolve_hosts
from launcher.vms.ssh import HostError, HostSpec
from jobs.schema import load_cluster, load_recipe
from jobs.schema.errors import ConfigError, UsageError
from jobs.schema.vms import VmsConfig

HOSTS = ("127.0.0.2", "127.0.0.3")
PORT = int(os.environ.get("VMS_LOCAL_PORT", "2222"))
SRC = "cluster config test"


@pytest.fixture
def vms(vm_hosts: Path, tmp_path: Path) -> VmsConfig:
    """The loopback VMs as a cluster config section, each host's remote_dir under this test's tmp_path."""
    return VmsConfig(hosts=HOSTS, user="root", identity_file=str(vm_hosts / "client_key"), port=PORT,
                     known_hosts="ignore", remote_dir=str(tmp_path / "hosts" / "{host}"), python=sys.executable)


def refused(exc: pytest.ExceptionInfo) -> str:
    """The error's first line, checked to be the only one besides the HINT."""
    lines = str(exc.value).splitlines()
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  HINT: ")), lines
    return lines[0]


# ------------------------------------------------------------------------------------------ running commands
def test_a_command_runs_on_each_host_at_its_own_address(vms: VmsConfig) -> None:
    """Each host is reached at its own address (sshd's $SSH_CONNECTION: client ip, port, server ip, port), and a
    failing command's exit status and output come back rather than an exception."""
    specs = ssh.host_specs(vms, HOSTS)
    done = ssh.run_all(specs, 'echo "$SSH_CONNECTION"; echo "to stderr" >&2; exit 3')
    assert sorted(done) == sorted(HOSTS)
    for host, result in done.items():
        assert result.stdout.split()[2] == host
        assert (result.exit_status, result.stderr, result.ok) == (3, "to stderr\n", False)


def test_a_command_reads_its_input(vms: VmsConfig) -> None:
    import asyncio

    done = asyncio.run(ssh.run(ssh.host_specs(vms, HOSTS)[1], "tr a-z A-Z", input="quiet words\n"))
    assert (done.exit_status, done.stdout) == (0, "QUIET WORDS\n")


def test_sync_tree_keeps_modes_into_a_home_relative_folder(vms: VmsConfig, tmp_path: Path) -> None:
    """A secret stays 0600, a script 0755, a file larger than one write chunk arrives whole, and "~/" means the
    remote user's home while a space in the path is no second argument."""
    src = tmp_path / "src"
    (src / "conf").mkdir(parents=True)
    files = {"secrets.yaml": (0o600, b"token: x\n"), "run.sh": (0o755, b"#!/bin/sh\n"),
             "conf/big.bin": (0o644, os.urandom(3 * (1 << 18) + 7))}
    for rel, (mode, data) in files.items():
        (src / rel).write_bytes(data)
        (src / rel).chmod(mode)
    top = f"launcher-test-{uuid.uuid4().hex[:8]}"
    remote = f"~/{top}/code dir"
    spec = ssh.host_specs(vms, HOSTS)[0]
    try:
        ssh.sync_tree(spec, [(src / rel, rel) for rel in files], remote)
        listing = ssh.run_all([spec], f"cd {ssh.shell_path(remote)} && stat -c '%a %n' secrets.yaml run.sh "
                              "conf/big.bin && sha256sum conf/big.bin")[spec.address]
        landed = (Path("~root").expanduser() / top / "code dir" / "run.sh").is_file()  # the VMs' user is root
    finally:
        ssh.run_all([spec], f"rm -rf {ssh.shell_path('~/' + top)}")
    assert landed
    assert listing.ok, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[:3] == ["600 secrets.yaml", "755 run.sh", "644 conf/big.bin"]
    assert lines[3].split()[0] == hashlib.sha256(files["conf/big.bin"][1]).hexdigest()


def test_each_host_gets_its_own_remote_dir(vms: VmsConfig, tmp_path: Path) -> None:
    """"{host}" in remote_dir: a file synced to both hosts lands in two folders, one per address."""
    note = tmp_path / "note.txt"
    note.write_text("hello")
    for spec in ssh.host_specs(vms, HOSTS):
        ssh.sync_tree(spec, [(note, "run/note.txt")], ssh.remote_path(vms, spec.address))
    for host in HOSTS:
        assert (tmp_path / "hosts" / host / "run" / "note.txt").read_text() == "hello"
    assert ssh.remote_path(vms, "127.0.0.3", "runs", "a b") == f"{tmp_path}/hosts/127.0.0.3/runs/a b"


def test_shell_path_keeps_home_and_quotes_the_rest() -> None:
    assert ssh.shell_path("~/a b/$(x)") == "\"$HOME\"/'a b/$(x)'"
    assert ssh.shell_path("/tmp/x;y") == "'/tmp/x;y'"


# ------------------------------------------------------------------------------------------ connection errors
def _fails(spec: HostSpec) -> str:
    with pytest.raises(HostError) as exc:
        ssh.run_all([spec], "true")
    return refused(exc)


def test_unreachable_host_is_named(vms: VmsConfig) -> None:
    line = _fails(replace(ssh.host_specs(vms, HOSTS)[0], address="127.0.0.9"))  # nothing listens there
    assert "127.0.0.9" in line and "connection refused" in line


def test_a_host_that_never_answers_times_out(vms: VmsConfig) -> None:
    """A socket that takes the TCP connection but never speaks SSH (a VM still booting, a firewall's
    tarpit): the wait ends after vms.connect_timeout_s with the host named."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.6", 0))
        silent.listen()  # never accepted: the kernel completes the handshake, nobody sends a banner
        spec = replace(ssh.host_specs(vms, HOSTS)[0], address="127.0.0.6", port=silent.getsockname()[1],
                       connect_timeout_s=1)
        line = _fails(spec)
    assert "127.0.0.6" in line and "no answer within 1 s" in line


def test_refused_login_names_the_user_and_the_key(vms: VmsConfig, tmp_path: Path) -> None:
    """A key the host does not know: the error says which user and which key were offered."""
    key = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    line = _fails(replace(ssh.host_specs(vms, HOSTS)[0], identity_file=str(key)))
    assert "refused" in line and "user root" in line and str(key) in line and "127.0.0.2" in line


@pytest.mark.parametrize("mode", [0o644, 0o660])
def test_key_readable_by_others_is_refused_before_connecting(vms: VmsConfig, vm_hosts: Path, tmp_path: Path,
                                                             mode: int) -> None:
    """OpenSSH skips such a key and the host says only "Permission denied (publickey)". The address has no
    sshd: a check made after connecting would report the refused connection instead."""
    key = tmp_path / "client_key"
    shutil.copy(vm_hosts / "client_key", key)
    key.chmod(mode)
    with pytest.raises(HostError) as exc:
        ssh.run_all([replace(ssh.host_specs(vms, HOSTS)[0], address="127.0.0.9", identity_file=str(key))], "true")
    assert f"mode {mode:04o}" in refused(exc) and str(key) in refused(exc)
    assert exc.value.hint == f"chmod 600 {key}"


def test_missing_key_file_is_named(vms: VmsConfig, tmp_path: Path) -> None:
    line = _fails(replace(ssh.host_specs(vms, HOSTS)[0], identity_file=str(tmp_path / "no_such_key")))
    assert "no_such_key" in line and "does not exist" in line


def test_unknown_host_key_says_how_to_add_it(vms: VmsConfig, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(HostError) as exc:
        ssh.run_all([replace(ssh.host_specs(vms, HOSTS)[1], known_hosts=str(known))], "true")
    assert "127.0.0.3" in refused(exc) and str(known) in refused(exc)
    assert f"ssh-keyscan -p {PORT} 127.0.0.3" in exc.value.hint and "known_hosts: ignore" in exc.value.hint


def test_one_unreachable_host_fails_the_call(vms: VmsConfig) -> None:
    """One good host and one without sshd: the bad one is named, not lost among the good results."""
    specs = ssh.host_specs(vms, ["127.0.0.2", "127.0.0.8"])
    with pytest.raises(HostError, match="127.0.0.8"):
        ssh.run_all(specs, "true")


# ------------------------------------------------------------------------------------------ host checks
def test_check_hosts_reports_each_hosts_python_and_torch(vms: VmsConfig) -> None:
    facts = check_hosts(vms, HOSTS, SRC)
    assert sorted(facts) == sorted(HOSTS)
    for host, one in facts.items():
        assert (one.address, one.python) == (host, platform.python_version())
        assert one.torch == importlib.metadata.version("torch") and one.cuda_devices >= 0


def test_no_interpreter_on_a_host(vms: VmsConfig) -> None:
    with pytest.raises(HostError) as exc:
        check_hosts(replace(vms, python="/nonexistent/python"), HOSTS, SRC)
    assert "127.0.0.2" in refused(exc) and "no interpreter" in refused(exc) and "/nonexistent/python" in refused(exc)


def test_torch_missing_on_a_host(vms: VmsConfig) -> None:
    bare = "/usr/bin/python3"
    if not Path(bare).exists() or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{bare} is missing or has torch: no interpreter without torch here")
    with pytest.raises(HostError) as exc:
        check_hosts(replace(vms, python=bare), HOSTS, SRC)
    assert "torch is not installed" in refused(exc) and bare in refused(exc)


def test_torch_older_than_the_floor(vms: VmsConfig, tmp_path: Path) -> None:
    """An old torch stands in as a module first on PYTHONPATH, put there by a vms.setup line: the probe runs
    after setup (where a virtual environment would be activated)."""
    old = tmp_path / "old_torch"
    old.mkdir()
    (old / "torch.py").write_text("__version__ = '1.13.1+cpu'\nclass cuda:\n"
                                  "    device_count = staticmethod(lambda: 0)\n")
    cfg = replace(vms, setup=(f"export PYTHONPATH={old}",))
    with pytest.raises(HostError) as exc:
        check_hosts(cfg, HOSTS, SRC)
    assert "torch 1.13.1+cpu is older" in refused(exc) and "127.0.0.2" in refused(exc)


def test_hosts_that_disagree_are_named_with_their_versions() -> None:
    base = HostFacts("10.0.0.1", "3.11.2", "2.13.0+cu121", 8, "a")
    compare_hosts([base, replace(base, address="10.0.0.2", python="3.11.9")])  # a patch release does not matter
    for other, words in ((replace(base, address="10.0.0.2", python="3.10.4"), ["Python 3.11", "Python 3.10"]),
                         (replace(base, address="10.0.0.3", torch="2.13.0+cpu"),
                          ["torch 2.13.0+cu121", "torch 2.13.0+cpu"])):
        with pytest.raises(HostError) as exc:
            compare_hosts([base, replace(base, address="10.0.0.9"), other])
        assert all(w in refused(exc) for w in ["10.0.0.1", other.address, *words]), refused(exc)


def test_release_compares_numerically() -> None:
    assert release("2.13.0+cpu") > release("2.4") and release("2.5.0a0") == (2, 5, 0)


# ------------------------------------------------------------------------------------------ which hosts
def test_hosts_from_the_list_first_nodes() -> None:
    cfg = VmsConfig(hosts=("h0", "h1", "h2"))
    assert resolve_hosts(cfg, SRC, 2) == ["h0", "h1"]
    with pytest.raises(ConfigError) as exc:
        resolve_hosts(cfg, SRC, 4)
    assert "parallel.nodes=4" in refused(exc) and "3 hosts" in refused(exc)


def test_hosts_from_a_command() -> None:
    cfg = VmsConfig(hosts_command="printf '10.0.0.5\\n\\n  10.0.0.6 \\nvm-7.internal\\n'")
    assert resolve_hosts(cfg, SRC, 3) == ["10.0.0.5", "10.0.0.6", "vm-7.internal"]
    assert resolve_hosts(cfg, SRC, 1) == ["10.0.0.5"]
    with pytest.raises(ConfigError) as exc:
        resolve_hosts(cfg, SRC, 5)
    assert "parallel.nodes=5" in refused(exc) and "3 hosts" in refused(exc)


@pytest.mark.parametrize("command, words", [
    ("echo 'ERROR: not logged in' >&2; echo partial; exit 4", ["exited with status 4", "ERROR: not logged in"]),
    ("true", ["printed no hosts"]),
    ("echo 10.0.0.1; echo 'x; rm -rf /'", ["printed 'x; rm -rf /'", "not a host"]),
    ("echo 10.0.0.1; echo 10.0.0.1", ["10.0.0.1 twice"]),
])
def test_hosts_command_failures(command: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_hosts(VmsConfig(hosts_command=command), SRC, 1)
    assert "vms.hosts_command" in refused(exc) and all(w in refused(exc) for w in words), refused(exc)


# ------------------------------------------------------------------------------------------ recipe rules
def _recipe(*overrides: str):
    return load_recipe("digits", ["parallel.procs_per_node=1", *overrides])


@pytest.mark.parametrize("overrides, words", [
    (["parallel.nodes=2"], ["no shared file system", "no checkpoint.uri"]),
    (["parallel.nodes=2", "checkpoint.uri=/shared/ckpt"], ["no shared file system", "/shared/ckpt"]),
    (["parallel.nodes=2", "checkpoint.uri=/shared/ckpt", "parallel.strategy=fsdp"], ["no shared file system"]),
])
def test_multi_node_rules(overrides: list[str], words: list[str]) -> None:
    cluster = load_cluster("local_vms")
    with pytest.raises(UsageError) as exc:
        check_recipe_on_vms(_recipe(*overrides), cluster, SRC)
    assert all(w in refused(exc) for w in words), refused(exc)


def test_runs_that_fit_vms_pass() -> None:
    cluster = load_cluster("local_vms")
    check_recipe_on_vms(_recipe("parallel.nodes=2", "checkpoint.uri=s3://b/p"), cluster, SRC)
    check_recipe_on_vms(_recipe("parallel.strategy=fsdp"), cluster, SRC)  # one VM: its own disk is enough
    # several VMs: each rank sends its own shard to the store (jobs/checkpoint/spread.py)
    for layout in (["parallel.strategy=fsdp"], ["parallel.strategy=pipeline", "trainer.micro_batch=64"]):
        check_recipe_on_vms(_recipe("parallel.nodes=2", "checkpoint.uri=s3://b/p", *layout), cluster, SRC)


@pytest.mark.parametrize("answering, waited_out, min_nodes, size", [
    (3, False, None, 3), (4, False, None, 3),  # every node answers: the recipe's size, at once
    (2, False, 1, None),  # fewer, before vms.host_wait_s: wait for the others
    (2, True, None, None), (2, True, 3, None),  # after it, without min_nodes or below it: no launch (stop)
    (2, True, 2, 2), (1, True, 1, 1), (0, True, 1, None),  # after it, at least min_nodes: those that answer
])
def test_the_launch_size_waits_for_every_node_then_takes_at_least_min_nodes(
        answering: int, waited_out: bool, min_nodes: int | None, size: int | None) -> None:
    assert launch_size(answering, 3, min_nodes, waited_out) == size


def test_a_change_of_size_is_said_once_each_way() -> None:
    recipe, cfg = _recipe("parallel.nodes=2", "trainer.micro_batch=32"), VmsConfig(hosts=("h0",), min_nodes=1,
                                                                                   host_wait_s=90)
    assert resize_line(2, 2, recipe, cfg) is None and resize_line(1, 1, recipe, cfg) is None
    assert resize_line(2, 1, recipe, cfg) == ("the run resumes on 1 of its 2 VMs (vms.min_nodes=1): the others did "
                                              "not answer within vms.host_wait_s=90 s; the global batch stays 64")
    assert resize_line(1, 2, recipe, cfg) == "the run resumes on all 2 VMs again; the global batch stays 64"


@pytest.mark.parametrize("overrides, min_nodes, words", [
    (["parallel.nodes=2", "trainer.micro_batch=64", "parallel.strategy=pipeline"], 1,
     ["vms.min_nodes=1 lets this run resume on 1 of its 2 VMs", "a pipeline needs at least 2 ranks",
      "raise vms.min_nodes to 2"]),
    (["parallel.nodes=3", "trainer.micro_batch=32", "trainer.global_batch=96"], 1,
     ["resume on 2 of its 3 VMs", "trainer.global_batch: 96 is not divisible", "raise vms.min_nodes to 3"]),
    (["parallel.nodes=2", "trainer.micro_batch=32"], 3, ["vms.min_nodes=3 is more than", "parallel.nodes=2"]),
])
def test_min_nodes_is_refused_when_a_smaller_run_could_not_resume(overrides: list[str], min_nodes: int,
                                                                  words: list[str]) -> None:
    """Every size from vms.min_nodes up must be a valid run, checked before launch: not after an hour of
    training, when a spot VM does not come back."""
    base = load_cluster("local_vms")
    cluster = dataclasses.replace(base, vms=dataclasses.replace(base.vms, min_nodes=min_nodes))
    with pytest.raises(UsageError) as exc:
        check_recipe_on_vms(_recipe("checkpoint.uri=s3://b/p", *overrides), cluster, SRC)
    said = refused(exc) + str(exc.value.hint)
    assert all(w in said for w in words), said
    cluster = dataclasses.replace(base, vms=dataclasses.replace(base.vms, min_nodes=1))
    check_recipe_on_vms(_recipe("checkpoint.uri=s3://b/p", "parallel.nodes=2", "parallel.strategy=fsdp",
                                "trainer.micro_batch=16"), cluster, SRC)  # 64 = 16 x 2 x 2 = 32 x 2 x 1


# ------------------------------------------------------------------------------------------ through the CLI
def test_launch_with_an_open_key_exits_2_and_writes_nothing(vm_hosts: Path, tmp_path: Path, runs_dir: Path) -> None:
    key = tmp_path / "client_key"
    shutil.copy(vm_hosts / "client_key", key)
    key.chmod(0o644)
    cluster = tmp_path / "vms.yaml"
    cluster.write_text(f"backend: vms\nvms:\n  hosts: [{', '.join(HOSTS)}]\n  user: root\n  identity_file: {key}\n"
                       f"  port: {PORT}\n  known_hosts: ignore\n  python: {sys.executable}\n"
                       f"  remote_dir: '{tmp_path}/hosts/{{host}}'\n")
    proc = run_cli("launch", "digits", "--cluster", str(cluster), runs_dir=runs_dir)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 2 and "mode 0644" in errors[0] and errors[1] == f"  HINT: chmod 600 {key}", errors
    assert list(runs_dir.iterdir()) == [] and not (tmp_path / "hosts").exists()


def test_a_sweep_on_vms_is_refused_and_writes_nothing(vm_hosts: Path, tmp_path: Path, runs_dir: Path) -> None:
    """Grid and random sweeps are not built for VMs (a Bayesian one is: tests/test_vms_sweep.py): refused after the
    hosts were checked, before any run directory exists, naming the sweep that does run."""
    cluster = tmp_path / "vms.yaml"
    cluster.write_text(f"backend: vms\nvms:\n  hosts: [{', '.join(HOSTS)}]\n  user: root\n"
                       f"  identity_file: {vm_hosts / 'client_key'}\n  port: {PORT}\n  known_hosts: ignore\n"
                       f"  remote_dir: '{tmp_path}/hosts/{{host}}'\n")
    proc = run_cli("sweep", "digits", "parallel.procs_per_node=1", "--grid", "optim.lr=0.01,0.02", "--cluster",
                   str(cluster), runs_dir=runs_dir)
    assert proc.returncode == 2 and "grid and random sweeps do not run on VMs (2 trials)" in proc.stderr, proc.stderr
    assert "use --search bayes" in proc.stderr
    assert list(runs_dir.iterdir()) == [] and not (tmp_path / "hosts").exists()


def test_another_runs_folder_on_node_0_is_refused(vm_hosts: Path, tmp_path: Path) -> None:
    """A run of the same name from another runs directory (another id) already has a folder on node 0: its
    checkpoints would be resumed as this run's. Refused with the other id, and the new local run directory
    is removed."""
    cluster = tmp_path / "vms.yaml"
    cluster.write_text(f"backend: vms\nvms:\n  hosts: [{', '.join(HOSTS)}]\n  user: root\n"
                       f"  identity_file: {vm_hosts / 'client_key'}\n  port: {PORT}\n  known_hosts: ignore\n"
                       f"  remote_dir: '{tmp_path}/hosts/{{host}}'\n")
    theirs = tmp_path / "hosts" / HOSTS[0] / "runs" / "same"
    theirs.mkdir(parents=True)
    (theirs / "run.json").write_text('{"run_id": "0123456789ab"}')
    runs = tmp_path / "runs"
    proc = run_cli("launch", "digits", "parallel.procs_per_node=1", "--run-name", "same", "--cluster", str(cluster),
                   runs_dir=runs)
    assert proc.returncode == 2 and "holds another run named same (run id 0123456789ab" in proc.stderr, proc.stderr
    assert not (runs / "same").exists() and json.loads((theirs / "run.json").read_text()) == {"run_id": "0123456789ab"}


def test_node_0s_ssh_folder_is_private_and_holds_only_the_runs_known_hosts(vms: VmsConfig, tmp_path: Path) -> None:
    """What launch sends node 0's supervisor: the key, and of known_hosts only the run's hosts' lines, in a folder
    of mode 0700 whatever the VM's umask (one SSH connection, no run)."""
    import asyncio

    from launcher.backends.vms import send_ssh_files

    known = tmp_path / "known_hosts"
    known.write_text(f"[{HOSTS[0]}]:{PORT} ssh-ed25519 AAAAnode0\nbank.example.com ssh-ed25519 AAAAbank\n")
    cfg = replace(vms, known_hosts=str(known))
    staging = tmp_path / "staging"
    staging.mkdir()

    async def send() -> None:
        async with await ssh.connect(ssh.host_specs(vms, HOSTS)[0]) as conn:  # its known_hosts: ignore
            await conn.run(f"mkdir -p {tmp_path}/hosts/{HOSTS[0]}/ssh && chmod 777 {tmp_path}/hosts/{HOSTS[0]}/ssh")
            await send_ssh_files(conn, cfg, HOSTS[0], [HOSTS[0]], staging)

    asyncio.run(send())
    folder = tmp_path / "hosts" / HOSTS[0] / "ssh"
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    assert oct((folder / "identity").stat().st_mode & 0o777) == oct(0o600)
    assert (folder / "known_hosts").read_text() == f"[{HOSTS[0]}]:{PORT} ssh-ed25519 AAAAnode0\n"
    assert oct((folder / "known_hosts").stat().st_mode & 0o777) == oct(0o600)
