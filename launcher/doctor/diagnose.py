"""From a run's records to findings: pure functions of log text and run records, one per kind of failure.

Every rule looks at the last launch only (`records`), quotes the lines it relied on as file:line, and says
what to do in the launcher's own terms (`trainer.micro_batch=auto`, `slurm.time_min`, ...). The messages
matched are torch's, NCCL's, gloo's, botocore's and the OS's own, as the ranks log them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from launcher.doctor.findings import Finding, Line
from launcher.doctor.records import RankLog, RunRecords, log_level, log_time

# ----------------------------------------------------------------------------- what a rank's end looks like
EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)\b(?::|$)")
# A rank's error that only says another rank is gone or late: not where the trouble began.
SECONDARY = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out waiting \d+ ?ms|"
                       r"Watchdog caught collective operation timeout|remote process exited or there was a network "
                       r"error|NCCL communicator was aborted|ncclRemoteError|Socket Timeout|timed out after \d+")
OUTCOME = re.compile(r"INFO jobs\.trainer: (?:completed|preempted|pruned) at step \d+")


@dataclass(frozen=True)
class RankEnd:
    """How one rank's last launch ended, read from its log."""

    rank: int
    error: Optional[Line]  # the first fatal error it logged
    last: Optional[Line]  # its log's last line
    finished: bool  # it logged an outcome (completed, preempted, pruned)

    @property
    def secondary(self) -> bool:
        return self.error is not None and bool(SECONDARY.search(self.error.text))


def rank_end(log: RankLog) -> RankEnd:
    error = next((line for line in log.lines if _fatal(line)), None)
    return RankEnd(log.rank, error, log.lines[-1] if log.lines else None,
                   any(OUTCOME.search(line.text) for line in log.lines))


def _fatal(line: Line) -> bool:
    """jobs.train's "rank failed: ..." line, or the last line of a traceback in a script's output."""
    level = log_level(line)
    if level is not None:
        return level in ("ERROR", "CRITICAL") and "jobs.train: rank failed:" in line.text
    return bool(EXCEPTION.match(line.text))


@dataclass(frozen=True)
class FirstStop:
    """The rank(s) that stopped first and how: "error" (an error of its own), "silent" (its log just ends:
    killed or hung) or "secondary" (every rank only reported losing the others)."""

    ranks: tuple[int, ...]
    how: str
    lines: tuple[Line, ...]

    def named(self) -> str:
        return f"rank {self.ranks[0]}" if len(self.ranks) == 1 else "ranks " + ", ".join(map(str, self.ranks))


def first_stop(records: RunRecords) -> Optional[FirstStop]:
    """Which rank stopped first in a failed launch: the first to report an error of its own (earliest time;
    ranks within the same second are named together), else the ranks whose log ends without any error
    while others failed, else the first to report losing the others."""
    ends = [rank_end(log) for log in records.ranks]
    if records.info.failed_rank is not None:  # `launcher run`: the first rank whose script failed said so
        end = next((e for e in ends if e.rank == records.info.failed_rank), None)
        return FirstStop((records.info.failed_rank,), "error", (end.error,) if end and end.error else ())
    primary = [e for e in ends if e.error is not None and not e.secondary]
    if primary:
        return _earliest(primary, "error")
    failed = any(e.error for e in ends) or records.info.state == "failed"
    silent = [e for e in ends if e.error is None and not e.finished and e.last is not None]
    if failed and silent and len(silent) < len(ends):
        return FirstStop(tuple(e.rank for e in silent), "silent", tuple(e.last for e in silent if e.last))
    secondary = [e for e in ends if e.secondary]
    return _earliest(secondary, "secondary") if secondary else None


def _earliest(ends: Sequence[RankEnd], how: str) -> FirstStop:
    times = {e.rank: (log_time(e.error) or "") if e.error else "" for e in ends}
    first = min(times.values())
    chosen = [e for e in ends if times[e.rank] == first]
    return FirstStop(tuple(e.rank for e in chosen), how, tuple(e.error for e in chosen if e.error))


# ----------------------------------------------------------------------------- the rules
def _find(records: RunRecords, pattern: re.Pattern) -> list[Line]:
    return [line for line in records.lines() if pattern.search(line.text)]


def _rank_of(line: Line) -> str:
    m = re.search(r"rank(\d+)", line.path)
    return f"rank {m.group(1)}" if m else "another rank"


def _on_rank(line: Line) -> str:
    m = re.search(r"rank(\d+)", line.path)
    return f" on rank {m.group(1)}" if m else ""


GPU_OOM = re.compile(r"CUDA out of memory\.(?: Tried to allocate ([\d.]+ [KMGT]iB))?|out of memory with a micro "
                     r"batch of 1 sample")
CPU_OOM = re.compile(r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory): you tried to allocate "
                     r"(\d+) bytes")
RECOVERED_OOM = re.compile(r"out of memory at step (\d+)")
RECOVERED_NOTE = "WARNING jobs.trainer: out of memory in the "
# jobs.training.trainer's line at the start of training, in its two forms (a fixed and an automatic micro batch)
BATCH_FIXED = re.compile(r"INFO jobs\.trainer: (\d+) (?:ranks|data-parallel replicas)[^=]* x micro batch (\d+) x "
                         r"(\d+) accumulation = global batch (\d+)")
BATCH_AUTO = re.compile(r"INFO jobs\.trainer: micro batch (\d+) x accumulation (\d+) x (\d+) ranks = (\d+)")


@dataclass(frozen=True)
class Batch:
    ranks: int
    micro: int
    accumulation: int
    global_batch: int
    line: Line

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.ranks


def batch_of(records: RunRecords) -> Optional[Batch]:
    for line in records.lines():
        if m := BATCH_FIXED.search(line.text):
            return Batch(int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)), line)
        if m := BATCH_AUTO.search(line.text):
            return Batch(int(m.group(3)), int(m.group(1)), int(m.group(2)), int(m.group(4)), line)
    return None


def out_of_memory(records: RunRecords) -> list[Finding]:
    # a rank's note of an error trainer.micro_batch=auto recovered from quotes the allocator: not a failure
    hits = [hit for hit in _find(records, GPU_OOM) + _find(records, CPU_OOM) if RECOVERED_NOTE not in hit.text]
    if not hits:
        return _recovered_oom(records)
    hit, batch = hits[0], batch_of(records)
    m = GPU_OOM.search(hit.text) or CPU_OOM.search(hit.text)
    device = "GPU" if "CUDA" in hit.text else "CPU (host memory)" if "CPUAllocator" in hit.text else "device"
    asked = (m.group(1) if "CUDA" in hit.text else _bytes(m.group(1))) if m and m.group(1) else ""
    what = f"out of memory on the {device}{_on_rank(hit)}" + (f": tried to allocate {asked}" if asked else "")
    if batch:
        what += (f", with micro batch {batch.micro} x {batch.accumulation} accumulation x {batch.ranks} ranks = "
                 f"global batch {batch.global_batch}")
    evidence = (hit, batch.line) if batch else (hit,)
    return [Finding(what, oom_fix(batch, records.setting("trainer", "micro_batch")), evidence)]


def oom_fix(batch: Optional[Batch], micro_setting: object) -> str:
    lighter = "trainer.precision=bf16 (half the activation memory) or parallel.strategy=fsdp (shards parameters, " \
              "gradients and optimizer state over the ranks)"
    if micro_setting == "auto":
        return (f"trainer.micro_batch is auto already, and even its smallest micro batch did not fit: {lighter}, "
                "or a smaller model or shorter inputs")
    if batch is None:
        return f"set trainer.micro_batch=auto (the largest micro batch that fits, same global batch), or {lighter}"
    smaller = [d for d in range(batch.micro - 1, 0, -1) if batch.per_rank % d == 0]
    half = smaller[0] if smaller else 1
    return (f"set trainer.micro_batch=auto: it tries micro batch {batch.micro} and smaller and keeps the global "
            f"batch {batch.global_batch} by raising the accumulation (e.g. micro batch {half} x "
            f"{batch.per_rank // half} accumulation x {batch.ranks} ranks); or set trainer.micro_batch to a divisor "
            f"of the per-rank batch {batch.per_rank} below {batch.micro} ({', '.join(map(str, smaller)) or 'none'}); "
            f"or need less memory per sample: {lighter}")


def _recovered_oom(records: RunRecords) -> list[Finding]:
    hits = _find(records, RECOVERED_OOM)
    if not hits:
        return []
    return [Finding(f"ran out of memory {len(hits)} time(s) and carried on with a smaller micro batch "
                    "(trainer.micro_batch=auto)", "nothing to do: the global batch was kept, and the run's batch.json "
                    "holds the smaller micro batch, which a resumed or requeued run reuses", (hits[0], hits[-1]) if len(hits) > 1 else (hits[0],), failure=False)]


def _bytes(count: str) -> str:
    n = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit} ({count} bytes)"
        n /= 1024
    return count


TARGET_OUT_OF_BOUNDS = re.compile(r"IndexError: Target (-?\d+) is out of bounds")
DEVICE_ASSERT = re.compile(r"device-side assert triggered")
NLL_ASSERT = re.compile(r"Assertion `t >= 0 && t < n_classes` failed")


def label_out_of_range(records: RunRecords) -> list[Finding]:
    cpu, cuda, nll = (_find(records, p) for p in (TARGET_OUT_OF_BOUNDS, DEVICE_ASSERT, NLL_ASSERT))
    if not (cpu or cuda):
        return []
    classes = _classes(records)
    if cpu:
        target = int(TARGET_OUT_OF_BOUNDS.search(cpu[0].text).group(1))  # type: ignore[union-attr]
        what = f"a label outside the classifier's range{_on_rank(cpu[0])}: target {target} with {classes}"
        return [Finding(what, _label_fix(records, target), (cpu[0],))]
    what = f"CUDA device-side assert{_on_rank(cuda[0])}"
    what += f": the loss saw a label outside 0..num_classes-1 ({classes})" if nll else \
        f", usually a label outside the classifier's range ({classes})"
    fix = _label_fix(records, None) + ("" if nll else "; to see the failing operation, run once with "
                                       "CUDA_LAUNCH_BLOCKING=1 or on the CPU, where the error names it")
    return [Finding(what, fix, (cuda[0], *nll[:1]))]


def _classes(records: RunRecords) -> str:
    n = records.setting("model", "num_classes")
    if records.setting("model", "target"):
        return "your model's number of outputs"
    return f"model.num_classes={n}, so labels must be 0..{n - 1}" if isinstance(n, int) else "model.num_classes"


def _label_fix(records: RunRecords, target: Optional[int]) -> str:
    need = f" (at least {target + 1})" if target is not None and target >= 0 else ""
    if records.setting("model", "target"):
        return f"make your model's output size match the number of classes in the data{need}, or fix the labels"
    return (f"set model.num_classes to the number of classes in the data{need}, or fix the data's labels "
            "(they must be 0..num_classes-1; a negative label is never valid)")


CUDNN_NOT_INIT = re.compile(r"CUDNN_STATUS_NOT_INIT(?:IALIZED)?")


def cudnn_not_initialized(records: RunRecords) -> list[Finding]:
    hits = _find(records, CUDNN_NOT_INIT)
    if not hits:
        return []
    return [Finding(f"cuDNN could not start{_on_rank(hits[0])} (CUDNN_STATUS_NOT_INITIALIZED)",
                    "most often the GPU had no memory left for cuDNN's workspace (another process on the GPU: "
                    "nvidia-smi; or a micro batch at the edge of memory: trainer.micro_batch=auto), else a torch "
                    "build whose CUDA/cuDNN does not match the driver or a cuDNN from LD_LIBRARY_PATH shadowing "
                    "torch's own: check python -c 'import torch; print(torch.version.cuda, "
                    "torch.backends.cudnn.version())' against nvidia-smi's CUDA version", (hits[0],))]


NCCL_TIMEOUT = re.compile(r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(\d+), OpType=(\w+)"
                          r"(?:.*?Timeout\(ms\)=(\d+))?")
GLOO_TIMEOUT = re.compile(r"Timed out waiting (\d+) ?ms for (\w+) operation")
PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|remote process exited or there was a "
                       r"network error|ncclRemoteError")


def collective_failure(records: RunRecords) -> list[Finding]:
    """A collective that timed out or lost a peer, when no rank reported an error of its own (that error
    is the finding then): name the rank that stopped first."""
    timeouts = _find(records, NCCL_TIMEOUT) + _find(records, GLOO_TIMEOUT)
    lost = _find(records, PEER_LOST)
    first = first_stop(records)
    if not (timeouts or lost) or (first is not None and first.how == "error"):
        return []
    behind = _behind(records, timeouts)
    if behind is not None:
        return [behind]
    symptom = _timeout_said(timeouts[0]) if timeouts else f"{_rank_of(lost[0])} lost its connection to it"
    evidence = (timeouts or lost)[:1]
    if first is None:
        return [Finding(symptom, "look at every rank's log (launcher logs RUN --rank N) for the one that stopped "
                        "first", tuple(evidence))]
    if first.how == "silent":
        ends = ", ".join(f"{line.where}" for line in first.lines)
        what = f"{first.named()} stopped first: its log ends ({ends}) without an error, and then {symptom}"
        return [Finding(what, _stopped_fix(first.named()), (*first.lines, *evidence))]
    return [Finding(f"{symptom}; the first to report it was {first.named()}", WAITED_FIX,
                    (*first.lines[:1], *evidence[:1]))]


WAITED_FIX = ("every rank only reports waiting for the others: look for a rank that fell behind (a slow or hung "
              "data loader, a save or an evaluation only some ranks run, a node with a failing GPU or network: "
              "NCCL_DEBUG=INFO says more)")


def _stopped_fix(named: str) -> str:
    return (f"{named} was killed or hung: a SIGKILL from the kernel's out-of-memory killer (dmesg | grep -i "
            "'killed process'; on Slurm sacct -j JOB -o JobID,State,MaxRSS), the scheduler or a person, a node "
            "that died, or a hang in data loading or in code only some ranks run; if host memory ran out, lower "
            "data.num_workers or trainer.micro_batch")


WAITING_RANK = re.compile(r"\[Rank (\d+)\] Watchdog caught")
WORLD = re.compile(r"rank \d+ of (\d+) on ")


def _behind(records: RunRecords, timeouts: list[Line]) -> Optional[Finding]:
    """The ranks that did not report a timed-out collective while others did: they never reached it."""
    waiting = set()
    for line in timeouts:
        m = WAITING_RANK.search(line.text) or re.search(r"rank(\d+)", line.path)
        if m:
            waiting.add(int(m.group(1)))
    world = {log.rank for log in records.ranks}
    for line in records.lines():
        if m := WORLD.search(line.text):
            world |= set(range(int(m.group(1))))
            break
    behind = sorted(world - waiting)
    if not waiting or not behind:
        return None
    named = f"rank {behind[0]}" if len(behind) == 1 else "ranks " + ", ".join(map(str, behind))
    last = [log.lines[-1] for log in records.ranks if log.rank in behind and log.lines]
    where = f": its log ends at {', '.join(line.where for line in last)}" if last else ""
    what = f"{_timeout_said(timeouts[0])}; {named} never reached it (no timeout reported there){where}"
    return Finding(what, _stopped_fix(named), (timeouts[0], *last))


def _timeout_said(line: Line) -> str:
    if m := NCCL_TIMEOUT.search(line.text):
        limit = f" after {int(m.group(3)) // 1000} s" if m.group(3) else ""
        return f"an NCCL {m.group(2)} (collective number {m.group(1)}) timed out{_on_rank(line)}{limit}"
    m = GLOO_TIMEOUT.search(line.text)
    return f"a gloo {m.group(2) if m else ''} timed out{_on_rank(line)} after {int(m.group(1)) // 1000 if m else '?'} s"


PORT_IN_USE = re.compile(r"EADDRINUSE|[Aa]ddress already in use|server socket has failed to listen")
RDZV_TIMEOUT = re.compile(r"RendezvousTimeoutError|client socket has timed out after|RendezvousConnectionError")
PORT = re.compile(r"port: (\d+)|:(\d+) \(errno: 98|rendezvous [\w.-]+:(\d+)")


def rendezvous(records: RunRecords) -> list[Finding]:
    busy, late = _find(records, PORT_IN_USE), _find(records, RDZV_TIMEOUT)
    if busy:
        port = _port(records, busy[0])
        return [Finding(f"the rendezvous port{f' {port}' if port else ''} was already in use{_on_rank(busy[0])}: "
                        "the ranks could not start their process group",
                        f"another process holds the port on node 0 (a previous run that never exited, another job "
                        f"on the node): find it with ss -ltnp | grep :{port or 'PORT'} and stop it, then launch again "
                        "(a local run takes a free port at each launch; on Slurm the port is 20000 + job id mod "
                        "20000; on VMs set vms.rdzv_port)", (busy[0],))]
    if late:
        return [Finding(f"the ranks could not meet at the rendezvous{_on_rank(late[0])}",
                        "node 0 (MASTER_ADDR) was not reachable from the other nodes in time: check that node 0 "
                        "started, that the nodes reach each other on the rendezvous port (firewall, security "
                        "group), and that every node runs the same launch", (late[0],))]
    return []


def _port(records: RunRecords, line: Line) -> Optional[str]:
    for text in [line.text] + [ln.text for ln in records.lines() if "rendezvous" in ln.text]:
        if m := PORT.search(text):
            return next(g for g in m.groups() if g)
    return None


DISK_FULL = re.compile(r"No space left on device|Errno 28\b|Disk quota exceeded|Errno 122\b")
FREE_SPACE = re.compile(r"Free space in (\S+)")  # jobs.checkpoint names the folder to clean up
WRITING = re.compile(r"writing (\S+) failed|'(/[^']+)'")


def disk_full(records: RunRecords) -> list[Finding]:
    hits = _find(records, DISK_FULL)
    if not hits:
        return []
    m = FREE_SPACE.search(hits[0].text) or WRITING.search(hits[0].text)
    where = next((g.rstrip(".") for g in m.groups() if g), None) if m else None
    keep = records.setting("checkpoint", "keep_last")
    what = f"the disk was full{_on_rank(hits[0])}" + (f" in {where}" if where else "") + \
        (f" ({len(hits)} times)" if len(hits) > 1 else "")
    fix = (f"free space on that file system (df -h {where or '<path>'}); keep fewer checkpoints (checkpoint.keep_last"
           f"{f'={keep} now' if keep is not None else ''}); or move runs_dir or checkpoint.uri to a larger disk or "
           "an object store")
    return [Finding(what, fix, (hits[0], *hits[1:][-1:]))]


STORE_DOWN = re.compile(r"EndpointConnectionError|Could not connect to the endpoint URL|"
                        r"checkpoints? .* (?:were|was) not uploaded to")
ENDPOINT = re.compile(r"endpoint URL: \"?(https?://[^/\"\s]+)")


def store_down(records: RunRecords) -> list[Finding]:
    hits = _find(records, STORE_DOWN)
    if not hits:
        return []
    endpoint = next((m.group(1) for line in hits if (m := ENDPOINT.search(line.text))), None)
    uri = records.setting("checkpoint", "uri")
    pending = [line for line in hits if "not uploaded" in line.text]
    what = f"the checkpoint store{f' at {endpoint}' if endpoint else ''} could not be reached{_on_rank(hits[0])}"
    what += f" ({len(hits) - len(pending)} failed uploads)" if len(hits) > len(pending) else ""
    if pending or records.result.checkpoints_committed is False:
        what += "; checkpoints stayed local, not uploaded to " + (str(uri) if uri else "checkpoint.uri")
    fix = ("check that the store is up and that storage.endpoint_url and the credentials are right "
           "(launcher doctor --cluster C --store URI checks both from here); the run keeps its checkpoints in its "
           "run directory, and its next launch uploads them")
    return [Finding(what, fix, (hits[0], *pending[-1:]))]


def requeues(records: RunRecords) -> list[Finding]:
    """Preemptions, time limits and crashes counted by the Slurm job (run.json), and a run stopped by a signal."""
    info, result = records.info, records.result
    counts = {k: v for k, v in info.requeues.items() if isinstance(v, int) and v > 0}
    found = []
    if counts or info.stop_reason:
        said = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no requeues"
        stopped = info.stop_reason is not None
        what = f"Slurm requeued the run: {said}" + (f"; then {info.stop_reason}" if stopped else "")
        found.append(Finding(what, _requeue_fix(records, counts, stopped), failure=stopped))
    elif result.outcome == "preempted" and result.signal:
        found.append(Finding(f"the run was stopped by {result.signal} at step {result.step} after saving a "
                             "checkpoint", "nothing is lost: the same launch command resumes it", failure=False))
    return found


def _requeue_fix(records: RunRecords, counts: dict, stopped: bool) -> str:
    slurm = records.cluster.get("slurm") if isinstance(records.cluster.get("slurm"), dict) else {}
    tips = []
    if counts.get("timeouts"):
        tips.append(f"it reached the time limit {counts['timeouts']} time(s): raise slurm.time_min (now "
                    f"{slurm.get('time_min', '?')} min) so that one job does more")
    if counts.get("preemptions"):
        tips.append("preemptions are the partition's doing: a partition or QOS that is not preemptible avoids them")
    if counts.get("failures"):
        tips.append("a failure is a crash: see the errors above and the failures/ records")
    if stopped:
        tips.append("after raising the slurm.max_* limit it names, the same launch command resumes the run")
    return "; ".join(tips) or "nothing to do: every requeue resumed from the newest checkpoint"


RULES: tuple[Callable[[RunRecords], list[Finding]], ...] = (
    out_of_memory, label_out_of_range, cudnn_not_initialized, rendezvous, disk_full, store_down,
    collective_failure, requeues)


def diagnose(records: RunRecords) -> list[Finding]:
    """Every rule's findings; a launch that failed for no reason a rule knows gets the first error it logged."""
    found = [finding for rule in RULES for finding in rule(records)]
    if not any(f.failure for f in found):
        found += unexplained_failure(records)
    return found


def unexplained_failure(records: RunRecords) -> list[Finding]:
    first, info = first_stop(records), records.info
    if first is not None and first.lines:
        return [Finding(f"{first.named()} failed first: {first.lines[0].text.split(': ', 2)[-1].strip()[:200]}",
                        f"read its traceback: launcher logs {records.name} --rank {first.ranks[0]}", first.lines)]
    if info.state in ("failed", "stopped") or (info.exit_code or 0) != 0:
        code = f" with exit code {info.exit_code}" if info.exit_code is not None else ""
        return [Finding(f"the run failed{code}, and no rank logged an error", "a rank was killed before it could "
                        "log (the kernel's out-of-memory killer: dmesg; on Slurm sacct -j JOB), or it failed before "
                        "its log started: see the launch's console output or the Slurm job's output file")]
    return []
