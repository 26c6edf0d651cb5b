"""Helpers to bring up the loopback "VMs" (one real sshd on 127.0.0.2-127.0.0.5) for the vms backend's tests.

Standard library only (no pytest import), so it can be used from any test module or from the command line::

    python tests/vm_hosts.py        # start sshd (installing openssh-server if needed)

The work is done by ``scripts/vms_local.sh``; see it for the layout of the state folder (keys, config, log).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "vms_local.sh"
STATE_DIR = Path(os.environ.get("VMS_LOCAL_DIR", "/tmp/launcher-vms"))
PORT = int(os.environ.get("VMS_LOCAL_PORT", "2222"))
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
SSHD = Path("/usr/sbin/sshd")

# Installing openssh-server takes ~10 s; starting sshd well under one.
START_TIMEOUT_S = 300


def vms_available() -> tuple[bool, str]:
    """Whether ``scripts/vms_local.sh start`` can be expected to work here, and if not why (a skip message).

    sshd must be installed or installable (root and apt-get), and listening on 127.0.0.2 needs Linux, where
    all of 127.0.0.0/8 is local.
    """
    if not SCRIPT.is_file():
        return False, f"{SCRIPT} not found"
    if not sys.platform.startswith("linux"):
        return False, f"the loopback hosts 127.0.0.2-5 need Linux (this is {sys.platform})"
    for tool in ("bash", "ssh-keygen"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found"
    if not SSHD.exists():
        if os.geteuid() != 0:
            return False, f"{SSHD} is missing and installing openssh-server needs root"
        if shutil.which("apt-get") is None:
            return False, f"{SSHD} is missing and apt-get is not found"
    return True, ""


def ensure_vms() -> Path:
    """Start (installing if needed) the loopback sshd; idempotent. Returns the state folder (client_key in it).

    Raises RuntimeError carrying the script's output if it fails.
    """
    ok, reason = vms_available()
    if not ok:
        raise RuntimeError(f"loopback VMs not available: {reason}")
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        raise RuntimeError(f"scripts/vms_local.sh start timed out after {START_TIMEOUT_S}s:\n{out}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/vms_local.sh start failed (rc={proc.returncode}):\n{proc.stdout}")
    return STATE_DIR


if __name__ == "__main__":
    ok, why = vms_available()
    if not ok:
        print(f"loopback VMs not available: {why}", file=sys.stderr)
        sys.exit(1)
    print(f"sshd is up; state in {ensure_vms()}")
