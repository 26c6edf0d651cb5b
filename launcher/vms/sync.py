"""Which files `launch` copies to the VMs with `vms.code: sync`: the project's packages and the user's code folder,
less what must never leave this machine or does not belong on every VM.

Left out by default (`DEFAULT_EXCLUDES`): hidden files and folders (.git, .env, .ssh, .venv), SSH and TLS private
keys, secrets files, run folders (other runs' checkpoints, logs and secrets), caches. The user adds gitignore-style
patterns in the code folder's `.launcherignore` and in `vms.sync_exclude`; a `!pattern` copies a file after all.
What is left may weigh at most `vms.sync_max_mb`: more is refused, naming the biggest files, before anything starts.
"""
from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Optional, Sequence

from jobs.schema.errors import ConfigError, UsageError, short, short_path
from jobs.schema.files import REPO_ROOT
from jobs.schema.globs import Pattern, compile_pattern, excluded, read_patterns
from jobs.schema.secrets import SECRETS_FILE
from jobs.schema.vms import VmsConfig

IGNORE_FILE = ".launcherignore"
DEFAULT_EXCLUDES = (
    ".*",  # hidden: .git, .env, .ssh, .venv, editors' state
    "__pycache__/", "*.pyc", "venv/", "node_modules/", "artifacts/",
    "runs/",  # run folders: checkpoints, logs, and each run's secrets file
    SECRETS_FILE,
    # private keys: SSH (OpenSSH's default names), TLS and Java key stores
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "*.ppk", "*.jks",
    "*.keystore",
)
_DEFAULTS = [compile_pattern(p) for p in DEFAULT_EXCLUDES]
PACKAGES = ("launcher", "jobs")  # the project's code: what runs on the VMs
CONFIG_FOLDERS = ("recipes", "cluster_configs")
_SHOWN_BIGGEST = 3


def select(folder: Path, under: str, patterns: Sequence[Pattern] = _DEFAULTS) -> list[tuple[Path, str]]:
    """(local file, `under`/path) for each file of `folder` that `patterns` leave in; an excluded folder is not
    entered (as git: a file in it cannot be re-included)."""
    out: list[tuple[Path, str]] = []
    for top, dirs, files in os.walk(folder):
        rel_top = Path(top).relative_to(folder).as_posix()
        prefix = "" if rel_top == "." else f"{rel_top}/"
        dirs[:] = sorted(d for d in dirs if not excluded(list(patterns), prefix + d, True))
        for name in sorted(files):
            path = Path(top) / name
            if not excluded(list(patterns), prefix + name, False) and path.is_file():
                out.append((path, f"{under}/{prefix}{name}"))
    return out


def project_files(root: Path = REPO_ROOT) -> list[tuple[Path, str]]:
    """The project's packages and built-in configs, as (local file, path under code/)."""
    out: list[tuple[Path, str]] = []
    for name in (*PACKAGES, *CONFIG_FOLDERS):
        if (root / name).is_dir():
            out += select(root / name, f"launcher/{name}")
    return out


def user_patterns(cfg: VmsConfig, code_dir: Path, runs_root: Optional[Path]) -> list[Pattern]:
    """The defaults, the runs directory where it lies inside the code folder, then .launcherignore, then
    vms.sync_exclude: the last pattern that matches a path decides."""
    patterns = list(_DEFAULTS)
    if runs_root is not None and runs_root.resolve().is_relative_to(code_dir.resolve()) \
            and runs_root.resolve() != code_dir.resolve():
        patterns.append(compile_pattern("/" + runs_root.resolve().relative_to(code_dir.resolve()).as_posix() + "/"))
    patterns += _ignore_file(code_dir / IGNORE_FILE)
    return patterns + [compile_pattern(p) for p in cfg.sync_exclude]  # checked at load


def _ignore_file(path: Path) -> list[Pattern]:
    if not path.exists():
        return []
    try:
        lines = read_patterns(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{short_path(path)}: cannot be read: {getattr(err, 'strerror', None) or err}",
                         hint="make it a text file of gitignore-style patterns, or remove it") from None
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(compile_pattern(line))
        except ValueError as err:
            raise ConfigError(str(path), f"pattern {n}", f"{short(line)} {err}", "write gitignore-style "
                              "patterns, e.g. data/ or *.ckpt") from None
    return out


def code_to_copy(cfg: VmsConfig, code_dir: Optional[str], runs_root: Optional[Path], src: str,
                 root: Path = REPO_ROOT) -> list[tuple[Path, str]]:
    """The project's files and the user's code_dir (unless it is the project itself), checked against
    vms.sync_max_mb: UsageError naming the biggest files when they weigh more."""
    files = project_files(root)
    if code_dir and Path(code_dir).resolve() != root.resolve():
        files += select(Path(code_dir), "user", user_patterns(cfg, Path(code_dir), runs_root))
    check_size(files, cfg.sync_max_mb, src, code_dir)
    return files


def check_size(files: Sequence[tuple[Path, str]], max_mb: int, src: str, code_dir: Optional[str]) -> None:
    sizes = sorted(((_size(local), relative) for local, relative in files), reverse=True)
    total = sum(size for size, _ in sizes)
    if total <= max_mb << 20:
        return
    shown = [(size, rel) for size, rel in sizes[:_SHOWN_BIGGEST] if size >= 1 << 20] or sizes[:1]
    biggest = ", ".join(f"{rel} ({_mb(size)})" for size, rel in shown)
    where = f"{short_path(Path(code_dir) / IGNORE_FILE)}" if code_dir else IGNORE_FILE
    raise ConfigError(src, "vms.sync_max_mb", f"the code to copy to each VM weighs {_mb(total)}, over "
                      f"{max_mb} MB; the biggest: {biggest}", f"leave them out with a pattern in {where} or "
                      "vms.sync_exclude (e.g. data/), or raise vms.sync_max_mb; data belongs in a bucket")


def _size(path: Path) -> int:
    info = path.lstat()
    return info.st_size if stat.S_ISREG(info.st_mode) else 0  # a link is copied as a link


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"


# ----------------------------------------------------------------------------- node 0's SSH files
def known_hosts_for(text: str, hosts: Sequence[str], port: int, keep_patterns: bool = False) -> str:
    """The lines of a known_hosts file that name `hosts` (plain, "[host]:port" or hashed), not the user's whole
    list of machines; with `keep_patterns`, wildcard lines too (vms.hosts_command: replacement VMs get new
    addresses that a pattern such as 10.128.* may cover)."""
    names = {name for h in hosts for name in (h, f"[{h}]:{port}")}
    kept = [line for line in text.splitlines() if _names_any(line, names, keep_patterns)]
    return "".join(f"{line}\n" for line in kept)


def _names_any(line: str, names: set[str], keep_patterns: bool) -> bool:
    fields = line.split()
    if fields and fields[0].startswith("@"):  # @cert-authority, @revoked: the host patterns come second
        fields = fields[1:]
    if len(fields) < 2 or fields[0].startswith("#"):
        return False
    if fields[0].startswith("|1|"):
        return any(_hashed_is(fields[0], name) for name in names)
    patterns = [p for p in fields[0].split(",") if not p.startswith("!")]
    if keep_patterns and any(c in fields[0] for c in "*?"):
        return True
    return any(name == p or fnmatch.fnmatchcase(name, p.replace("[", "[[]")) for name in names for p in patterns)


def _hashed_is(entry: str, name: str) -> bool:
    """OpenSSH's HashKnownHosts form: |1|base64(salt)|base64(HMAC-SHA1(salt, name))."""
    try:
        salt, digest = (base64.b64decode(part, validate=True) for part in entry[3:].split("|", 1))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)
