"""Secrets never leave the process: planted credentials are used by the job but appear in no file of
the run (except the 0600 secrets.yaml) and in no line the CLI prints."""
from __future__ import annotations

import base64
import http.server
import io
import os
import stat
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

from conftest import read_result, run_cli
from jobs.schema import secrets
from jobs.schema import load_recipe

TOKEN = "tok-PLANTED-7f3a9c"  # inside model.pretrained's URL: the job must send it to fetch the weights
WANDB_KEY = "wandb-PLANTED-51be02"
AWS_SECRET = "aws-PLANTED-c0ffee"
ENDPOINT_PASSWORD = "endpoint-PLANTED-9d1e"
PLANTED = (TOKEN, WANDB_KEY, AWS_SECRET, ENDPOINT_PASSWORD)


# ----------------------------------------------------------------------------- pure
@pytest.mark.parametrize("text, shown", [
    ("https://user:pass@host/x.pt", "https://***@host/x.pt"),
    ("s3://AKIA:abc@bucket/key", "s3://***@bucket/key"),
    ("https://host/x.pt?token=abc&v=2", "https://host/x.pt?token=***&v=2"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Signature=f00&X-Amz-Date=1", "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Date=1"),
    ("s3://bucket/runs", "s3://bucket/runs"),
    ("user@example.com", "user@example.com"),  # no scheme: not a URL's user info
])
def test_redact_text(text: str, shown: str) -> None:
    assert secrets.redact_text(text) == shown


def test_split_and_overlay_give_back_the_real_values(tmp_path: Path) -> None:
    tree = {"name": "c", "storage": {"endpoint_url": f"http://u:{ENDPOINT_PASSWORD}@127.0.0.1:9"},
            "slurm": {"env": {"WANDB_API_KEY": WANDB_KEY, "NCCL_DEBUG": "WARN", "HF_TOKEN": ""}}}
    secrets.write_configs(tmp_path, {"cluster.yaml": tree})
    shown = (tmp_path / "cluster.yaml").read_text()
    assert WANDB_KEY not in shown and ENDPOINT_PASSWORD not in shown and "NCCL_DEBUG: WARN" in shown
    assert stat.S_IMODE((tmp_path / "secrets.yaml").stat().st_mode) == 0o600
    assert secrets.overlay(tmp_path / "cluster.yaml", yaml.safe_load(shown)) == tree
    secrets.write_configs(tmp_path, {"cluster.yaml": {"name": "c"}})  # relaunch without secrets
    assert not (tmp_path / "secrets.yaml").exists()


def test_log_filter_masks_values_and_urls() -> None:
    mask = secrets.RedactFilter(secrets.secret_values([{"env": {"MY_API_KEY": WANDB_KEY}}]))
    assert mask.mask(f"key {WANDB_KEY} and https://a:{TOKEN}@h/p") == "key *** and https://***@h/p"


# ----------------------------------------------------------------------------- a whole run
class _AuthServer(http.server.ThreadingHTTPServer):
    """Serves one weights file only to a client that sends the planted basic-auth token."""

    payload = b""
    authorized_gets = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _AuthServer

    def _authorized(self) -> bool:
        want = "Basic " + base64.b64encode(f"user:{TOKEN}".encode()).decode()
        if self.headers.get("Authorization") == want:
            return True
        self.send_response(401)
        self.end_headers()
        return False

    def do_HEAD(self) -> None:
        if self._authorized():
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.server.payload)))
            self.end_headers()

    def do_GET(self) -> None:
        if self._authorized():
            self.server.authorized_gets += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.server.payload)))
            self.end_headers()
            self.wfile.write(self.server.payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def weights_server() -> Iterator[_AuthServer]:
    from jobs.models import build_model

    buf = io.BytesIO()
    torch.save(build_model(load_recipe("digits").model).state_dict(), buf)
    server = _AuthServer(("127.0.0.1", 0), _Handler)
    server.payload = buf.getvalue()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _cluster(tmp_path: Path, backend: str) -> Path:
    path = tmp_path / f"secret_{backend}.yaml"
    path.write_text(yaml.safe_dump({
        "backend": backend,
        "storage": {"endpoint_url": f"http://minio:{ENDPOINT_PASSWORD}@127.0.0.1:9"},
        "slurm": {"partition": "debug", "time_min": 10, "grace_period_s": 60,
                  "env": {"WANDB_API_KEY": WANDB_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "OMP_NUM_THREADS": "1"}},
    }))
    return path


def _leaks(root: Path, allowed: set[Path]) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p not in allowed):
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {s}" for s in PLANTED if s.encode() in data]
    return found


@pytest.mark.slow  # a training run through the real CLI
def test_planted_secrets_reach_the_job_but_no_file_or_line(tmp_path: Path, runs_dir: Path,
                                                           weights_server: _AuthServer) -> None:
    url = f"http://user:{TOKEN}@127.0.0.1:{weights_server.server_port}/weights.pt"
    local, slurm = _cluster(tmp_path, "local"), _cluster(tmp_path, "slurm")
    overrides = ["trainer.max_steps=3", "checkpoint.every_steps=2", f"model.pretrained={url}",
                 "logging.tracker=wandb", "logging.progress_bar=false"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    printed = []
    for args in (["show", "digits", *overrides, "--cluster", str(local)],
                 ["launch", "digits", *overrides, "--cluster", str(local), "--run-name", "plain"],
                 ["status", "plain", "--cluster", str(local)],
                 ["logs", "plain", "--cluster", str(local)],
                 ["sbatch", "digits", *overrides, "--cluster", str(slurm), "--run-name", "script"],
                 ["show", "digits", "model.pretrained=http://u:" + TOKEN + "@h/x?bad", "model.width=-1"]):
        proc = run_cli(*args, runs_dir=runs_dir, env=env)
        printed.append(f"$ {' '.join(args[:2])}\n{proc.stdout}{proc.stderr}")
        assert proc.returncode == (2 if "model.width=-1" in args else 0), printed[-1]
    assert not [s for s in PLANTED if s in "\n".join(printed)], "\n".join(printed)

    run = runs_dir / "plain"
    assert read_result(run)["outcome"] == "completed"
    assert weights_server.authorized_gets >= 1  # the job used the real token
    assert "pretrained weights: http://***@127.0.0.1" in (run / "logs" / "rank0.log").read_text()
    assert list(run.glob("checkpoints/step-*/*"))
    assert any(b"http://***@127.0.0.1" in p.read_bytes() for p in run.glob("wandb/offline-run-*/*.wandb"))
    kept = {run / "secrets.yaml", runs_dir / "script" / "secrets.yaml"}
    for path in kept:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and TOKEN.encode() in path.read_bytes()
    assert _leaks(runs_dir, kept) == []
    assert os.path.exists(run / "model.pt")


def test_a_refused_secret_is_not_quoted_in_the_error(tmp_path: Path, runs_dir: Path) -> None:
    cluster = tmp_path / "bad.yaml"
    cluster.write_text(yaml.safe_dump({"backend": "slurm", "slurm": {"env": {"HF_TOKEN": f"x\n{TOKEN}"}}}))
    proc = run_cli("sbatch", "digits", "--cluster", str(cluster), "--run-name", "r", runs_dir=runs_dir)
    assert proc.returncode == 2 and "slurm.env.HF_TOKEN: the value contains a newline" in proc.stderr, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr and not (runs_dir / "r").exists()


@pytest.mark.parametrize("text", ["x" * 1_000_000, ";" * 1_000_000, "?a" * 500_000, "a://" * 250_000])
def test_redaction_of_a_long_argument_ends(text: str) -> None:
    """A script argument may hold 128 KiB: the secret patterns once scanned a run of letters (or of `;`) again
    from each of its characters, so 40,000 letters took 50 s of `launcher run` and a million would take hours.
    The alarm only stops a hang; a linear scan takes milliseconds."""
    import signal

    def hung(*_: object) -> None:
        raise TimeoutError("redact_text did not end within 20 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        assert secrets.redact_text(text) == text and secrets.secret_values([{"args": [text]}]) == set()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
