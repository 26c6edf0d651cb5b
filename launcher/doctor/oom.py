"""The doctor's out-of-memory rule: the allocator's message, the batch the run used, what `auto` would do."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from launcher.doctor.findings import Finding, Line
from launcher.doctor.ranks import lines_matching, on_rank
from launcher.doctor.records import RunRecords
from launcher.doctor.tracebacks import last_by_rank, shown, user_frame

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
    hits = [hit for hit in lines_matching(records, GPU_OOM) + lines_matching(records, CPU_OOM) if RECOVERED_NOTE not in hit.text]
    if not hits:
        return _recovered_oom(records)
    hit, batch = hits[0], batch_of(records)
    m = GPU_OOM.search(hit.text) or CPU_OOM.search(hit.text)
    device = "GPU" if "CUDA" in hit.text else "CPU (host memory)" if "CPUAllocator" in hit.text else "device"
    asked = (m.group(1) if "CUDA" in hit.text else _bytes(m.group(1))) if m and m.group(1) else ""
    what = f"out of memory on the {device}{on_rank(hit)}" + (f": tried to allocate {asked}" if asked else "")
    if batch:
        what += (f", with micro batch {batch.micro} x {batch.accumulation} accumulation x {batch.ranks} ranks = "
                 f"global batch {batch.global_batch}")
    evidence = (hit, batch.line) if batch else (hit,)
    if records.recipe.get("script"):  # the script sizes its own batches: the trainer's keys do not apply
        raised = next((tb for tb in last_by_rank(records) if GPU_OOM.search(tb.said) or CPU_OOM.search(tb.said)), None)
        if raised is None:
            return [Finding(what, SCRIPT_OOM_FIX, evidence)]
        frame = user_frame(raised, records.info.code_dir)
        return [Finding(f"{what} at {shown(frame, records.info.code_dir)}", SCRIPT_OOM_FIX, (hit, frame.logged))]
    return [Finding(what, oom_fix(batch, records.setting("trainer", "micro_batch")), evidence)]


SCRIPT_OOM_FIX = ("give the script a smaller batch size (its own flag) and accumulate gradients over several "
                  "micro batches to keep the effective batch, or autocast to bf16, or shard the model (FSDP); with "
                  "much memory reserved but unallocated, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


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
    hits = lines_matching(records, RECOVERED_OOM)
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
