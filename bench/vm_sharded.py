"""Model-parallel figures on VMs for `make bench` (issue #25), on the loopback "VMs" of bench/vm_notice.py
(2 hosts sharing this machine's cores, stand-in GCE metadata servers, moto's S3):

(1) seconds from a GCE preemption notice to the stop's sharded checkpoint committed in S3, for FSDP on
    2 VMs x 1 rank with the 101M-parameter GPT (each rank sends its own shard; rank 0 commits the manifest
    last; goal <= 15 s, as for DDP);
(2) seconds from the supervisor's relaunch (the hosts known: its "launch N" line) to the first step after
    it, when the run resumes on 1 of its 2 VMs (vms.min_nodes=1: DCP reshards 2 ranks' state into one, the
    global batch kept by accumulating) against a resume on the same 2 VMs.

    python -m bench.vm_sharded          (or make bench BENCH_ARGS="--only vmshards")
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from bench.vm_notice import BUCKET, ENV, GPT_100M, HOSTS, ONE_RANK_PER_NODE, REPO, Loopback, cancelled_on_error, \
    loopback, notice_to_upload, say, seconds, wait_for
from vm_hosts import vms_available  # noqa: E402 (bench.vm_notice put the tests' helpers on the path)

FSDP = ["parallel.strategy=fsdp"]
LAUNCH_LINE = re.compile(r"^(\S+ \S+) supervisor: launch (\d+) \(attempt \d+\) on (.*) \(rendezvous", re.M)


def shrinking_cluster(lb: Loopback, min_nodes: Optional[int]) -> Path:
    """The loopback cluster config with its hosts from a file the bench edits, and vms.min_nodes (its own
    file: Loopback.cli() writes lb.cluster() afresh at every call)."""
    config = yaml.safe_load(lb.cluster().read_text())
    hosts_file = lb.folder / "hosts.txt"
    hosts_file.write_text("\n".join(HOSTS) + "\n")
    config["vms"].pop("hosts")
    config["vms"].update(hosts_command=f"cat {hosts_file}", host_wait_s=1,
                         **({"min_nodes": min_nodes} if min_nodes else {}))
    path = lb.folder / f"vms-{min_nodes or 'all'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(lb: Loopback, cluster: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "launcher", *args, "--cluster", str(cluster), "--runs-dir", str(lb.folder / "runs")]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"launcher {' '.join(args)} failed ({out.returncode}): {out.stdout}{out.stderr}")


def launch_times(lb: Loopback, name: str) -> list[tuple[float, int, str]]:
    """(unix time, launch number, hosts) of each launch in node 0's supervisor log (its clock is this one's)."""
    text = (lb.host_run(HOSTS[0], name) / "logs" / "supervisor.log").read_text()
    return [(datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(m[2]), m[3])
            for m in LAUNCH_LINE.finditer(text)]


def resume_after_notice(lb: Loopback, name: str, shrink: bool, timeout: float = 300) -> dict:
    """FSDP on 2 VMs, a notice on node 1, then the relaunch on 1 VM (`shrink`: node 1 never returns) or on both:
    seconds from the relaunch's launch line to its first step."""
    cluster = shrinking_cluster(lb, 1 if shrink else None)
    cli(lb, cluster, "launch", "gpt_small", *GPT_100M, *FSDP, "parallel.nodes=2", *ONE_RANK_PER_NODE,
           f"checkpoint.uri=s3://{BUCKET}/runs", "--run-name", name)
    hosts_file = lb.folder / "hosts.txt"
    with cancelled_on_error(lb, name):
        wait_for(f"{name}: step 3", lambda: lb.steps_done(name) >= 3, timeout)
        if shrink:
            hosts_file.write_text(f"{HOSTS[0]}\n")
        raised = time.time()
        lb.metadata[HOSTS[1]].notice()
        wait_for(f"{name}: the preemption to be counted", lambda: lb.head_info(name).get("requeues"), timeout)
        lb.metadata[HOSTS[1]].reset()
        first = wait_for(f"{name}: the relaunch's first step", lambda: lb.first_step(name, after=raised), timeout)
        launches = wait_for(f"{name}: the relaunch's launch line", lambda: [x for x in launch_times(lb, name)
                                                                             if x[1] == 2], 30)
        cli(lb, cluster, "cancel", name)
        wait_for(f"{name} to end", lambda: lb.ended(name), timeout, poll=0.5)
    hosts_file.write_text("\n".join(HOSTS) + "\n")
    return {"relaunch_to_first_step_s": first["time"] - launches[0][0], "hosts": launches[0][2],
            "notice_to_first_step_s": first["time"] - raised}


def run() -> dict:
    """Every figure, as {"results": ..., "rows": ...} for bench/run.py; {"skipped": why} without sshd here."""
    ok, why = vms_available()
    if not ok:
        return {"skipped": f"loopback VMs cannot run here: {why}"}
    with loopback() as lb:
        say("FSDP on 2 VMs: notice -> committed sharded checkpoint")
        notice = notice_to_upload(lb, "fsdpnotice", layout=FSDP)
        same = resume_after_notice(lb, "same", shrink=False)
        fewer = resume_after_notice(lb, "fewer", shrink=True)
    if "127.0.0.3" in fewer["hosts"] or "127.0.0.3" not in same["hosts"]:
        raise RuntimeError(f"the resumes ran on {same['hosts']} and {fewer['hosts']}, not 2 and 1 VMs")
    results = {"notice": notice, "same_size": same, "fewer": fewer}
    return {"results": results, "rows": rows(results)}


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    n, same, fewer = r["notice"], r["same_size"], r["fewer"]
    return [
        (f"GCE notice -> sharded checkpoint committed in S3 (FSDP, {(n['parameters'] or 0) / 1e6:.0f}M GPT, "
         "2 VMs x 1 rank)", seconds(n["notice_to_manifest_in_s3_s"]), f"GCE window {n['gce_window_s']:.0f} s",
         f"goal <= {n['goal_s']:.0f} s; {n['checkpoint_mb']} MB; each rank sends its shard, the manifest last; "
         f"steps lost {n['steps_lost']}"),
        ("relaunch (hosts known) -> first step, resumed on 1 of 2 VMs (vms.min_nodes=1)",
         seconds(fewer["relaunch_to_first_step_s"]), f"same 2 VMs {seconds(same['relaunch_to_first_step_s'])}",
         f"ratio {fewer['relaunch_to_first_step_s'] / same['relaunch_to_first_step_s']:.2f}x; 101M GPT, DCP "
         f"reshards 2 ranks' state into 1; notice -> training again {seconds(fewer['notice_to_first_step_s'])} "
         f"(host_wait_s=1) vs {seconds(same['notice_to_first_step_s'])}"),
    ]


if __name__ == "__main__":
    out = run()
    print(json.dumps(out.get("results", out), indent=2))
    for row in out.get("rows", []):
        print("  ".join(row))
    sys.exit(0)
