"""SSH to the VMs through asyncssh: one event loop reaches every host at once.

The core is async (`connect`, `run`, `run_all_async`, `sync_tree_async`); the CLI calls the thin sync
wrappers (`run_all`, `sync_tree`). Every failure to reach a host becomes a `HostError`: one line naming the
host and what to do, as `ssh` users would want it (OpenSSH's own messages say "Permission denied
(publickey)" and leave the user to guess which key and which user were tried).

Values put into remote shell commands are always quoted (`shell_path`, `shlex.quote`); the user's OpenSSH
client config is not read (a `Host *` block there must not change what the launcher does).
"""
from __future__ import annotations

import asyncio
import getpass
import os
import posixpath
import shlex
import socket
import stat
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Optional, Sequence, TypeVar, Union

with warnings.catch_warnings():
    # recent cryptography releases warn that DSA is deprecated when asyncssh merely names its key types: a line
    # on every command's console that the user can do nothing about (DSA keys are still refused by sshd)
    warnings.filterwarnings("ignore", message="DSA is deprecated")
    import asyncssh

from launcher.shell import shell_path
from jobs.schema.errors import UsageError, one_line, short, short_path
from jobs.schema.vms import HOST_FIELD, VmsConfig

T = TypeVar("T")
_CHUNK = 1 << 18  # bytes written to a channel before waiting for it to drain
_SPOOL = 64 << 20  # a tar stream up to this size is built in memory, a larger one in a temporary file


class HostError(UsageError):
    """A host cannot be reached or used: the message names it and says what to do."""


@dataclass(frozen=True)
class HostSpec:
    """How to reach one host (a VM's address and the cluster config's SSH settings)."""

    address: str
    port: int = 22
    user: Optional[str] = None  # None: this machine's user
    identity_file: Optional[str] = None  # None: the SSH agent, then ~/.ssh/id_*
    known_hosts: Optional[str] = None  # None: ~/.ssh/known_hosts; "ignore": no host key check
    connect_timeout_s: float = 15

    @property
    def login(self) -> str:
        """user@address:port, as messages show it."""
        return f"{self.user or getpass.getuser()}@{self.address}:{self.port}"


@dataclass(frozen=True)
class Completed:
    """What a remote command did."""

    exit_status: Optional[int]  # None: it was killed by a signal
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def last_error_line(self) -> str:
        """The last non-empty line of stderr (else stdout): what a one-line message quotes."""
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return one_line(lines[-1], 200)
        return f"exit status {self.exit_status}"


def host_specs(cfg: VmsConfig, hosts: Sequence[str]) -> list[HostSpec]:
    """One HostSpec per address, with the cluster config's SSH settings."""
    key = os.path.expanduser(cfg.identity_file) if cfg.identity_file else None
    return [HostSpec(h, cfg.port, cfg.user, key, cfg.known_hosts, cfg.connect_timeout_s) for h in hosts]


def remote_path(cfg: VmsConfig, host: str, *parts: str) -> str:
    """The host's remote_dir ("{host}" replaced by its address) joined with `parts`; unquoted, and it may
    begin with "~/": put it into a command through `shell_path`."""
    return posixpath.join(cfg.remote_dir.replace(HOST_FIELD, host), *parts)


def check_key_permissions(path: str) -> None:
    """Refuse a private key that is missing, unreadable, or readable by group or others: OpenSSH skips such a
    key ("UNPROTECTED PRIVATE KEY FILE") and the host then answers "Permission denied (publickey)", which
    does not say why (SkyPilot users report a key of mode 0660 this way)."""
    shown = short_path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise HostError(f"SSH identity file {shown} does not exist",
                        hint="set vms.identity_file to your private key (e.g. ~/.ssh/id_ed25519)") from None
    except OSError as exc:
        raise HostError(f"cannot read SSH identity file {shown}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise HostError(f"SSH identity file {shown} is not a file", hint="set vms.identity_file to the private key")
    if mode & 0o077:
        raise HostError(f"SSH private key {shown} has mode {stat.S_IMODE(mode):04o}: readable by other users, "
                        "so OpenSSH refuses to use it", hint=f"chmod 600 {shlex.quote(path)}")
    if not os.access(path, os.R_OK):
        raise HostError(f"cannot read SSH identity file {shown} (mode {stat.S_IMODE(mode):04o}, owner uid "
                        f"{os.stat(path).st_uid})", hint="run as the key's owner, or chown it")


def _client_keys(spec: HostSpec) -> dict:
    """asyncssh's key options: with an identity file, that key only (as OpenSSH's IdentitiesOnly: an agent
    offering many keys would hit the server's MaxAuthTries first); without one, the agent and ~/.ssh/id_*."""
    if spec.identity_file is None:
        return {}
    check_key_permissions(spec.identity_file)
    try:
        key = asyncssh.read_private_key(spec.identity_file)
    except asyncssh.KeyEncryptionError:
        raise HostError(f"SSH private key {short_path(spec.identity_file)} needs a passphrase",
                        hint="load it into ssh-agent and leave vms.identity_file unset, or use a key "
                        "without one") from None
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise HostError(f"{short_path(spec.identity_file)} is not an SSH private key: {exc}",
                        hint="set vms.identity_file to the private key (not the .pub file)") from None
    return {"client_keys": [key], "agent_path": None}


def _known_hosts(spec: HostSpec) -> Union[None, tuple, str]:
    if spec.known_hosts == "ignore":
        return None  # asyncssh: accept any host key
    if spec.known_hosts is None:
        return ()  # asyncssh: ~/.ssh/known_hosts where it exists
    path = os.path.expanduser(spec.known_hosts)
    if not os.path.isfile(path):
        raise HostError(f"vms.known_hosts file {short_path(path)} does not exist",
                        hint="point it at a known_hosts file, or use known_hosts: ignore for throwaway VMs")
    return path


async def connect(spec: HostSpec) -> asyncssh.SSHClientConnection:
    """An SSH connection to the host; HostError (one line: the host and what to do) if there is none."""
    options = {**_client_keys(spec), "known_hosts": _known_hosts(spec)}
    try:
        return await asyncssh.connect(spec.address, spec.port, username=spec.user or (), config=None,
                                      connect_timeout=spec.connect_timeout_s, **options)
    except asyncssh.PermissionDenied:
        key = spec.identity_file or "the SSH agent's keys and ~/.ssh/id_*"
        raise HostError(f"{spec.login}: SSH login refused for user {spec.user or getpass.getuser()} with key "
                        f"{short_path(key)}",
                        hint="add the public key to that user's ~/.ssh/authorized_keys on the VM, or set "
                        "vms.user / vms.identity_file") from None
    except asyncssh.HostKeyNotVerifiable:
        where = spec.known_hosts or "~/.ssh/known_hosts"
        port = f"-p {spec.port} " if spec.port != 22 else ""
        raise HostError(f"{spec.login}: the host's key is not in {where}",
                        hint=f"after checking its fingerprint: ssh-keyscan {port}{spec.address} >> {where}; or "
                        "set vms.known_hosts: ignore for throwaway VMs") from None
    except asyncssh.DisconnectError as exc:
        raise HostError(f"{spec.login}: SSH connection closed by the host: {one_line(exc.reason, 200)}") from None
    except (asyncio.TimeoutError, TimeoutError):
        raise HostError(f"{spec.login}: no answer within {spec.connect_timeout_s:g} s",
                        hint="check that the VM is running, its address, and that a firewall allows SSH "
                        "from here (vms.connect_timeout_s sets the wait)") from None
    except ConnectionRefusedError:
        raise HostError(f"{spec.login}: connection refused (no SSH server listening)",
                        hint="check that the VM is up and sshd runs there, and vms.port") from None
    except socket.gaierror as exc:
        raise HostError(f"{spec.login}: unknown host ({exc.strerror})", hint="check vms.hosts / "
                        "vms.hosts_command") from None
    except OSError as exc:
        raise HostError(f"{spec.login}: cannot connect: {exc.strerror or exc}",
                        hint="check that the VM is up and reachable from here") from None


async def run(target: Union[HostSpec, asyncssh.SSHClientConnection], command: str,
              input: Optional[str] = None, timeout: Optional[float] = None) -> Completed:
    """Run a shell command on a host (a spec: connect for it, then close); never raises on a non-zero exit.
    A command still running after `timeout` seconds is a HostError."""
    if isinstance(target, HostSpec):
        async with await connect(target) as conn:
            return await run(conn, command, input, timeout)
    try:
        done = await target.run(command, input=input, timeout=timeout, check=False)
    except asyncssh.TimeoutError:
        host = target.get_extra_info("peername", ("?",))[0]
        raise HostError(f"{host}: {short(command, 60)} did not finish within {timeout:g} s") from None
    except (asyncssh.ChannelOpenError, asyncssh.ConnectionLost, asyncssh.DisconnectError) as exc:
        host = target.get_extra_info("peername", ("?",))[0]
        raise HostError(f"{host}: the SSH connection was lost while running {short(command, 60)}: "
                        f"{one_line(str(exc), 120)}", hint="check that the VM is still up, then run the command "
                        "again") from None
    return Completed(done.exit_status if done.exit_signal is None else None,
                     _text(done.stdout), _text(done.stderr))


def _text(out: Union[str, bytes, None]) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


async def gather_hosts(coros: dict[str, Awaitable[T]]) -> dict[str, T]:
    """Await one coroutine per host together; all of them finish, then the first error in host order is
    raised (the same host is named whichever answered first)."""
    results = await asyncio.gather(*coros.values(), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return dict(zip(coros, results))  # type: ignore[arg-type]


async def run_all_async(specs: Sequence[HostSpec], command: str,
                        timeout: Optional[float] = None) -> dict[str, Completed]:
    return await gather_hosts({s.address: run(s, command, timeout=timeout) for s in specs})


def run_all(specs: Sequence[HostSpec], command: str, timeout: Optional[float] = None) -> dict[str, Completed]:
    """Run `command` on every host at once: address -> Completed. HostError if a host cannot be reached."""
    return asyncio.run(run_all_async(specs, command, timeout))


async def sync_tree_async(target: Union[HostSpec, asyncssh.SSHClientConnection],
                          files: Sequence[tuple[Path, str]], remote_dir: str,
                          folder_mode: Optional[int] = None) -> None:
    """Copy local files to `remote_dir` (created; "~/" allowed; given `folder_mode` whatever the VM's umask) on
    one host, each to its path relative to it: one tar stream over one channel, file modes kept (a secrets file
    of mode 0600 stays 0600)."""
    if isinstance(target, HostSpec):
        async with await connect(target) as conn:
            return await sync_tree_async(conn, files, remote_dir, folder_mode)
    d = shell_path(remote_dir)
    chmod = f" && chmod {folder_mode:o} {d}" if folder_mode is not None else ""
    # -p: modes as archived whatever the remote umask; --no-same-owner: files belong to the SSH user
    command = f"mkdir -p {d}{chmod} && tar --no-same-owner -p -xf - -C {d}"
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL) as spool:
        _write_tar(spool, files)
        spool.seek(0)
        async with target.create_process(command, encoding=None) as proc:
            while chunk := spool.read(_CHUNK):
                proc.stdin.write(chunk)
                await proc.stdin.drain()
            proc.stdin.write_eof()
            done = await proc.wait(check=False)
    if done.exit_status != 0:
        host = target.get_extra_info("peername", ("?",))[0]
        result = Completed(done.exit_status, _text(done.stdout), _text(done.stderr))
        raise HostError(f"{host}: copying {len(files)} files into {short_path(remote_dir)} failed: "
                        f"{result.last_error_line()}", hint="check that the folder is writable and the disk "
                        "not full")


def _write_tar(out: object, files: Sequence[tuple[Path, str]]) -> None:
    with tarfile.open(fileobj=out, mode="w") as tar:  # type: ignore[arg-type]
        for local, relative in files:
            info = tar.gettarinfo(str(local), arcname=relative)
            info.uid = info.gid = 0  # who owns them locally means nothing on the VM
            info.uname = info.gname = ""
            if info.isreg():
                with open(local, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def sync_tree(spec: HostSpec, files: Sequence[tuple[Path, str]], remote_dir: str) -> None:
    """`sync_tree_async` from synchronous code."""
    asyncio.run(sync_tree_async(spec, files, remote_dir))
