"""VM figures for `make bench` (issue #11), on the loopback "VMs" of scripts/vms_local.sh (one sshd on
127.0.0.2/127.0.0.3, each address a host with its own folder), stand-in GCE metadata servers on the
hosts' addresses and moto's S3 holding the checkpoints, as in tests/test_vms_runs.py:

(1) seconds from a GCE preemption notice (raised on node 1's metadata server) to the stop's checkpoint
    committed in S3, for a 101M-parameter GPT on 2 nodes x 1 rank, against GCE's 30 s window (goal
    <= 15 s): measured here (notice raised -> step-N/manifest.json listed in the bucket) and by the
    supervisor (notice received -> every node exited, rank 0 after flushing its upload);
(2) steps lost per preemption (goal <= 1): the highest step finished before the relaunch minus the
    step the relaunch resumed from (its "resumed from ... step N" log line);
(3) seconds from `launcher launch` to the first finished step on the VMs backend, 2 nodes vs 1 node
    (digits, one rank per node, medians), and a bare local `launcher launch` for reference.

The machine is one machine: both "VMs" share its cores and S3 is a process next to them, so the
figures are indicative of the launcher's own overheads, not of a cloud's network.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the loopback VMs, metadata servers and moto are the tests' helpers
from metadata_server import MetadataServer  # noqa: E402
from s3_server import TEST_CREDENTIALS, S3Server, free_port  # noqa: E402
from vm_hosts import ensure_vms, vms_available  # noqa: E402

from jobs.training.agreement import TIMED_CALLS  # noqa: E402

HOSTS = ["127.0.0.2", "127.0.0.3"]
BUCKET = "bench-vms"
GCE_WINDOW_S, GOAL_S = 30.0, 15.0
ENV = {**os.environ, **TEST_CREDENTIALS, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# bench/fsdp_memory.py's 101M-parameter GPT (8 blocks of width 1024, untied embeddings) in the
# gpt_small recipe; a tiny batch and no evaluation, so the steps are short and only the stop saves
GPT_100M = ["model.kwargs.dim=1024", "model.kwargs.layers=8", "model.kwargs.heads=16", "model.kwargs.seq_len=64",
            "model.kwargs.tied_embeddings=false", "data.kwargs.seq_len=64", "trainer.global_batch=2",
            "trainer.micro_batch=1", "trainer.max_steps=100000", "trainer.eval_every=100000",
            "checkpoint.every_steps=100000", "checkpoint.keep_last=1", "logging.log_every=1"]
ONE_RANK_PER_NODE = ["parallel.procs_per_node=1"]
DIGITS_ONE_STEP = ["trainer.max_steps=1", "checkpoint.at_end=false", "trainer.micro_batch=32", "logging.log_every=1"]
RESUMED = re.compile(r"resumed from (\S+): step (\d+)")
ENDED = ("completed", "stopped", "cancelled", "failed")
T = TypeVar("T")


STARTED = time.monotonic()


def say(what: str) -> None:
    """Progress on stderr: the section takes minutes, and a hang should show where it is."""
    print(f"[vms bench {time.monotonic() - STARTED:6.1f} s] {what}", file=sys.stderr, flush=True)


def wait_for(what: str, probe: Callable[[], Optional[T]], timeout: float, poll: float = 0.05) -> T:
    say(f"waiting for {what}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


@dataclass
class Loopback:
    """The VMs, their metadata servers, S3, and one folder holding every host's files and the local runs."""

    folder: Path
    keys: Path  # scripts/vms_local.sh's state folder: client_key
    s3: S3Server
    metadata: dict[str, MetadataServer]

    def cluster(self) -> Path:
        """A GCE-style cluster config: notices come from each host's own metadata server. The rendezvous
        port is a free one, as other runs on this machine may hold the default."""
        config = {"backend": "vms", "storage": {"endpoint_url": self.s3.endpoint},
                  "vms": {"hosts": HOSTS, "user": "root", "identity_file": str(self.keys / "client_key"),
                          "port": 2222, "known_hosts": "ignore", "remote_dir": str(self.folder / "hosts" / "{host}"),
                          "python": sys.executable, "env": {"OMP_NUM_THREADS": "1", **TEST_CREDENTIALS},
                          "host_wait_s": 60, "provider": "gce", "rdzv_port": free_port(),
                          "metadata_url": f"http://{{host}}:{self.metadata[HOSTS[0]].port}"}}
        path = self.folder / "vms.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "launcher", *args, "--cluster", str(self.cluster()),
               "--runs-dir", str(self.folder / "runs")]
        out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"launcher {' '.join(args)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def host_run(self, host: str, name: str) -> Path:
        return self.folder / "hosts" / host / "runs" / name

    def head_info(self, name: str) -> dict:
        """Node 0's run.json, kept by the supervisor ({} while it is absent or being replaced)."""
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.host_run(HOSTS[0], name) / "run.json").read_text())
        return {}

    def ended(self, name: str) -> Optional[str]:
        state = self.head_info(name).get("state")
        return state if state in ENDED and "supervisor_pid" not in self.head_info(name) else None

    def steps_done(self, name: str) -> int:
        """The highest step rank 0 logged, on whichever host it ran."""
        best = 0
        for host in HOSTS:
            with contextlib.suppress(OSError):
                for line in (self.host_run(host, name) / "metrics.jsonl").read_text().split("\n")[:-1]:
                    with contextlib.suppress(ValueError):
                        best = max(best, int(json.loads(line).get("step", 0)))
        return best

    def first_step(self, name: str, after: float = 0.0) -> Optional[dict]:
        """first_step.json written by rank 0 (on either host) at or after `after` (unix seconds)."""
        for host in HOSTS:
            with contextlib.suppress(OSError, ValueError):
                found = json.loads((self.host_run(host, name) / "first_step.json").read_text())
                if found["time"] >= after:
                    return found
        return None

    def resumed(self, name: str) -> Optional[tuple[str, int]]:
        for host in HOSTS:
            with contextlib.suppress(OSError):
                found = RESUMED.search((self.host_run(host, name) / "logs" / "rank0.log").read_text())
                if found:
                    return found[1], int(found[2])
        return None

    def supervisor_log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.host_run(HOSTS[0], name) / "logs" / "supervisor.log").read_text()[-3000:]
        return "(no supervisor log)"


@contextlib.contextmanager
def loopback() -> Iterator[Loopback]:
    keys = ensure_vms()
    port = free_port()  # the same on every host's address, as 80 is on every VM
    servers = {host: MetadataServer(host, port) for host in HOSTS}
    s3 = S3Server(free_port())  # its request log goes to a file (tests/s3_server.py)
    try:
        s3.start()
        for server in servers.values():
            server.start()
        s3.create_bucket(BUCKET)
        with tempfile.TemporaryDirectory(prefix="bench-vms-", dir="/tmp") as tmp:
            yield Loopback(Path(tmp), keys, s3, servers)
    finally:
        for server in servers.values():
            server.stop()
        s3.stop()


@contextlib.contextmanager
def cancelled_on_error(lb: Loopback, name: str) -> Iterator[None]:
    """A run a failed measurement leaves behind is cancelled and waited for: it must not outlive its folder."""
    try:
        yield
    except BaseException:
        if lb.head_info(name) and not lb.ended(name):
            with contextlib.suppress(Exception):
                lb.cli("cancel", name)
                wait_for(f"run {name} to end after cancel", lambda: lb.ended(name), timeout=120, poll=0.5)
        raise


def committed_steps(s3: S3Server, name: str) -> Callable[[], Optional[int]]:
    """A probe: the step of run `name`'s first committed checkpoint in S3 (manifest.json is the commit
    marker, written last), None while there is none."""
    import boto3
    from botocore.config import Config

    # moto answers a listing late while it takes in a GB-sized upload: wait for it rather than fail
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing",
                          config=Config(read_timeout=300, retries={"max_attempts": 10, "mode": "standard"}))

    def probe() -> Optional[int]:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{name}/")
        steps = [re.search(r"/step-(\d+)/manifest\.json$", o["Key"]) for o in listed.get("Contents", [])]
        return min((int(m[1]) for m in steps if m), default=None)
    return probe


def counted(info: dict) -> Optional[dict]:
    """run.json once the supervisor has counted a preemption (notice_to_saved_s is written just before)."""
    return info if info.get("requeues") else None


def save_breakdown(lb: Loopback, name: str, step: int) -> dict:
    """Where the stop's save spent its time, from rank 0's saves.jsonl (written by the checkpointer: the
    local commit's time and duration, the remote commit's time). Files start up as they are written, so
    the upload overlaps the local commit: "upload after the local commit" is what is left of it then."""
    events = {}
    for path in lb.folder.glob(f"hosts/*/runs/{name}/checkpoints/saves.jsonl"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("step") == step:
                events[event["event"]] = event
    text = "".join(p.read_text() for p in lb.folder.glob(f"hosts/*/runs/{name}/logs/rank0.log"))
    model = re.search(r"model GPT: ([\d,]+) parameters", text)
    save, upload = events.get("save", {}), events.get("upload", {})
    started = save["time"] - save["commit_s"] if save else None
    return {"parameters": int(model[1].replace(",", "")) if model else None,
            "host_copy_blocked_s": save.get("blocked_s"), "local_commit_s": save.get("commit_s"),
            "checkpoint_mb": round(save["bytes"] / 1e6, 1) if save else None,
            "save_to_remote_commit_s": round(upload["time"] - started, 2) if save and upload else None,
            "upload_after_local_commit_s": round(upload["time"] - save["time"], 2) if save and upload else None,
            "save_started_after_notice_s": None if started is None else started}


def raw_upload_s(lb: Loopback, name: str) -> Optional[float]:
    """Seconds a plain boto3 upload_file of the run's last local checkpoint takes to moto: the floor that the
    S3 stand-in on this machine sets under notice -> committed."""
    import boto3

    folders = sorted(lb.folder.glob(f"hosts/*/runs/{name}/checkpoints/step-*"))
    if not folders:
        return None
    client = boto3.client("s3", endpoint_url=lb.s3.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    say(f"uploading {folders[-1].name} with boto3 for reference")
    start = time.monotonic()
    for path in sorted(folders[-1].iterdir()):
        client.upload_file(str(path), BUCKET, f"raw/{path.name}")
    return time.monotonic() - start


def notice_to_upload(lb: Loopback, name: str = "notice", timeout: float = 240, layout: Sequence[str] = ()) -> dict:
    """(1) and (2): a GCE notice on node 1 mid-run, the stop's checkpoint in S3, the relaunch's resume
    (`layout`: overrides such as parallel.strategy=fsdp; DDP by default)."""
    lb.cli("launch", "gpt_small", *GPT_100M, *layout, "parallel.nodes=2", *ONE_RANK_PER_NODE,
           f"checkpoint.uri=s3://{BUCKET}/runs", "--run-name", name)
    with cancelled_on_error(lb, name):
        # past the launch's first steps, where the stop agreement measures the step time and chooses its mode
        wait_for("step 6 of the 101M GPT", lambda: lb.steps_done(name) >= TIMED_CALLS + 2, timeout)
        in_s3 = committed_steps(lb.s3, name)
        at_notice = lb.steps_done(name)
        raised = time.time()
        lb.metadata[HOSTS[1]].notice()
        step = wait_for("the stop's manifest.json in S3", in_s3, timeout, poll=0.2)
        committed = time.time()
        info = wait_for("the preemption to be counted", lambda: counted(lb.head_info(name)), timeout)
        # every node has exited: nothing of launch 1 logs any more, and launch 2 has not started training
        before = lb.steps_done(name)
        lb.metadata[HOSTS[1]].reset()  # the VM came back without a pending notice
        relaunched = wait_for("the relaunch's first step", lambda: lb.first_step(name, after=committed), timeout)
        source, resumed = wait_for("the resume line", lambda: lb.resumed(name), 10)
        lb.cli("cancel", name)
        wait_for("the cancelled run to end", lambda: lb.ended(name), timeout, poll=0.5)
    breakdown = save_breakdown(lb, name, step)
    if breakdown["save_started_after_notice_s"] is not None:
        breakdown["save_started_after_notice_s"] = round(breakdown["save_started_after_notice_s"] - raised, 2)
    return {**breakdown, "boto3_upload_same_bytes_s": raw_upload_s(lb, name),
            "steps_done_at_notice": at_notice, "steps_after_notice": step - at_notice, "nodes": 2,
            "ranks_per_node": 1, "notice_raised": raised,
            "notice_to_manifest_in_s3_s": committed - raised, "saved_step": step,
            "supervisor_notice_to_saved_s": info.get("notice_to_saved_s"), "last_notice": info.get("last_notice"),
            "last_requeue": info.get("last_requeue"), "highest_step_before_relaunch": before,
            "resumed_from_step": resumed, "resumed_from": source, "steps_lost": before - resumed,
            "notice_to_first_step_after_resume_s": relaunched["time"] - raised,
            "gce_window_s": GCE_WINDOW_S, "goal_s": GOAL_S}


def vm_first_step(lb: Loopback, nodes: int, name: str, timeout: float = 180) -> tuple[float, float]:
    """Seconds from `launcher launch` (VMs backend, digits, one step) to rank 0's first finished step, and of
    those the seconds `launcher launch` itself took (host checks, code sync, starting the supervisor)."""
    start = time.time()
    lb.cli("launch", "digits", *DIGITS_ONE_STEP, f"parallel.nodes={nodes}", *ONE_RANK_PER_NODE,
           f"checkpoint.uri=s3://{BUCKET}/startup", "--run-name", name)
    returned = time.time()
    with cancelled_on_error(lb, name):
        first = wait_for(f"run {name}'s first step", lambda: lb.first_step(name), timeout)
        state = wait_for(f"run {name} to end", lambda: lb.ended(name), timeout, poll=0.2)
    if state != "completed":
        raise RuntimeError(f"run {name} ended {state}: {lb.supervisor_log(name)}")
    return first["time"] - start, returned - start


def local_first_step(name: str) -> float:
    """The same one-step digits run by the local backend, one rank: the reference without SSH."""
    with tempfile.TemporaryDirectory(prefix="bench-vms-local-", dir="/tmp") as tmp:
        start = time.time()
        subprocess.run([sys.executable, "-m", "launcher", "launch", "digits", *DIGITS_ONE_STEP, *ONE_RANK_PER_NODE,
                        "--runs-dir", tmp, "--run-name", name], cwd=REPO, env=ENV, capture_output=True, check=True)
        return json.loads((Path(tmp) / name / "first_step.json").read_text())["time"] - start


def startup(lb: Loopback, repeats: int) -> dict:
    """(3): medians of `repeats` launches each, alternating so that load on the machine hits all alike."""
    runs: dict[str, list] = {"vms_2_nodes": [], "vms_1_node": [], "local": []}
    for i in range(repeats):
        runs["vms_2_nodes"].append(vm_first_step(lb, 2, f"start2n{i}"))
        runs["vms_1_node"].append(vm_first_step(lb, 1, f"start1n{i}"))
        runs["local"].append(local_first_step(f"local{i}"))
    med = statistics.median
    return {"vms_2_nodes_s_to_first_step": med(r[0] for r in runs["vms_2_nodes"]),
            "vms_2_nodes_s_in_launch_command": med(r[1] for r in runs["vms_2_nodes"]),
            "vms_1_node_s_to_first_step": med(r[0] for r in runs["vms_1_node"]),
            "vms_1_node_s_in_launch_command": med(r[1] for r in runs["vms_1_node"]),
            "local_s_to_first_step": med(runs["local"]), "runs": runs, "repeats": repeats}


def seconds(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def rows(n: dict, s: dict) -> list[tuple[str, str, str, str]]:
    return [
        (f"GCE notice -> checkpoint committed in S3 ({(n['parameters'] or 0) / 1e6:.0f}M GPT, 2 VMs x 1 rank)",
         seconds(n["notice_to_manifest_in_s3_s"]), f"GCE window {n['gce_window_s']:.0f} s",
         f"goal <= {n['goal_s']:.0f} s; saved at step {n['saved_step']}; supervisor: notice -> every node exited "
         f"{seconds(n['supervisor_notice_to_saved_s'])}"),
        ("  of which: steps trained after the notice (save started), host copy, local commit",
         f"{n['steps_after_notice']} steps ({seconds(n['save_started_after_notice_s'])})",
         f"{seconds(n['host_copy_blocked_s'])}, {seconds(n['local_commit_s'])}",
         f"save -> committed in S3 {seconds(n['save_to_remote_commit_s'])} for {n['checkpoint_mb']} MB (upload left "
         f"after the local commit {seconds(n['upload_after_local_commit_s'])}); a plain boto3 upload of the same files "
         f"to moto {seconds(n['boto3_upload_same_bytes_s'])}"),
        ("steps lost per preemption", str(n["steps_lost"]), "goal <= 1",
         f"highest step before relaunch {n['highest_step_before_relaunch']}, resumed from step "
         f"{n['resumed_from_step']}; notice -> training again {seconds(n['notice_to_first_step_after_resume_s'])}"),
        ("VMs launch -> first step (digits, 2 VMs x 1 rank)", seconds(s["vms_2_nodes_s_to_first_step"]),
         f"1 VM {seconds(s['vms_1_node_s_to_first_step'])}",
         f"local backend {seconds(s['local_s_to_first_step'])}; medians of {s['repeats']}; `launcher launch` "
         f"itself {seconds(s['vms_2_nodes_s_in_launch_command'])} / {seconds(s['vms_1_node_s_in_launch_command'])}"),
    ]


def run(repeats: int = 3) -> dict:
    """Every figure, as {"results": ..., "rows": ...} for bench/run.py; {"skipped": why} without sshd here."""
    ok, why = vms_available()
    if not ok:
        return {"skipped": f"loopback VMs cannot run here: {why}"}
    with loopback() as lb:
        notice = notice_to_upload(lb)
        starts = startup(lb, repeats)
    return {"results": {"notice": notice, "startup": starts}, "rows": rows(notice, starts)}


if __name__ == "__main__":
    out = run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    print(json.dumps(out.get("results", out), indent=2))
    for row in out.get("rows", []):
        print("  ".join(row))
