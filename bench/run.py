"""`make bench`: writes bench/results/bench.json and prints a table.

(a) trainer s/step vs a hand-written DDP loop (same model, data, ranks; one run, ratio; goal <= 1.03)
(b) seconds from `launcher launch` to the first finished step vs bare torchrun on a minimal script
(b') the same for `launcher run` of that minimal script itself (a script run: wrapper per rank)
(d) FSDP vs DDP on a 101M-parameter GPT, 2 ranks: per-rank parameter+gradient+optimizer bytes (goal
    FSDP <= 0.55 of DDP), peak RSS and step time
(d') FSDP vs tensor parallel x FSDP (TP=2 x FSDP=2) on the same GPT, 4 ranks: peak RSS per rank, the same
    bytes, step time (bench/tp_memory.py)
(c) checkpoints (when jobs.checkpoint is present): blocked seconds per async save vs torch.save
    of the same >= 100M-parameter state; seconds to resume vs a fresh start
(e) step time of DDP, FSDP and a 2-stage pipeline (GPipe, 1F1B at 2, 4, 8 microbatches) on one GPT and
    global batch, 2 ranks, and the pipeline's measured bubble vs (p-1)/(m+p-1) (bench/pipeline_step.py)
(f) training blocked per sharded async save vs a synchronous DCP save of the same 57M-parameter FSDP
    state on 2 ranks (goal <= 0.1), and the time to commit (bench/shard_save.py)
(g) VMs over SSH on loopback (bench/vm_notice.py): seconds from a GCE spot notice to the stop's checkpoint
    committed in S3 for a 101M-parameter GPT on 2 VMs (goal <= 15 s of GCE's 30 s), steps lost per
    preemption (goal <= 1), launch -> first step on 2 VMs vs 1 VM vs the local backend
(h) Bayesian sweep (TPE + ASHA pruning) vs a 27-point grid on digits: trial-steps to reach the grid's best
    val/acc as a fraction of the grid's, median of 3 seeds (goal <= 0.4; bench/bayes_sweep.py)
(j) hangs and crashes on the local Slurm: seconds from the fault to training again, restarted inside the job
    vs through a requeue (bench/slurm_restarts.py; needs `make slurm-up`)
(i) the slow-rank report's cost: trainer s/step with trainer.slow_rank_factor=1.5 vs 0 (A/B pairs), and its
    own work timed alone as a share of the step (goal <= 1%; bench/slow_rank.py)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def bench_step_overhead(recipe: str) -> dict:
    proc = subprocess.run(torchrun("-m", "bench.ddp_overhead", recipe), cwd=REPO, env=ENV, capture_output=True,
                          text=True, check=True)
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def bench_startup(repeats: int) -> dict:
    ours, bare = [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.time()
            subprocess.run([sys.executable, "-m", "launcher", "launch", "digits", "trainer.max_steps=1",
                            "checkpoint.at_end=false", "--runs-dir", tmp, "--run-name", f"startup{i}"],
                           cwd=REPO, env=ENV, capture_output=True, check=True)
            first = json.loads((Path(tmp) / f"startup{i}" / "first_step.json").read_text())["time"]
            ours.append(first - start)
        start = time.time()
        # not check=True: see bench_script
        proc = subprocess.run(torchrun(str(REPO / "bench" / "minimal_ddp.py")), cwd=REPO, env=ENV,
                              capture_output=True, text=True)
        bare.append(json.loads(proc.stdout.strip().splitlines()[-1])["first_step_time"] - start)
    return {"launcher_s_to_first_step": statistics.median(ours), "torchrun_s_to_first_step": statistics.median(bare),
            "repeats": repeats}


def bench_script(repeats: int) -> dict:
    """`launcher run` of the minimal DDP script vs bare torchrun of it: seconds to the first step and
    to the end (the launcher adds config checks, a run directory, a wrapper process per rank)."""
    script = str(REPO / "bench" / "minimal_ddp.py")
    ours, bare, ours_total, bare_total = [], [], [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.time()
            subprocess.run([sys.executable, "-m", "launcher", "run", script, "--procs-per-node", "2",
                            "--runs-dir", tmp, "--run-name", f"script{i}"], cwd=tmp, env=ENV, capture_output=True,
                           check=True)
            ours_total.append(time.time() - start)
            log = (Path(tmp) / f"script{i}" / "logs" / "rank0.log").read_text().splitlines()
            ours.append(json.loads(next(line for line in log if line.startswith("{")))["first_step_time"] - start)
        start = time.time()
        # not check=True: under load a gloo rank sometimes aborts in teardown after its step (see
        # jobs.train.exit_cleanly); the step it timed is what is measured, and a missing time still fails
        proc = subprocess.run(torchrun(script), cwd=REPO, env=ENV, capture_output=True, text=True)
        bare_total.append(time.time() - start)
        bare.append(json.loads(proc.stdout.strip().splitlines()[-1])["first_step_time"] - start)
    med = statistics.median
    return {"launcher_run_s_to_first_step": med(ours), "torchrun_s_to_first_step": med(bare),
            "launcher_run_s_total": med(ours_total), "torchrun_s_total": med(bare_total), "repeats": repeats}


def bench_fsdp() -> dict:
    """FSDP vs DDP per-rank training memory and step time on a 101M-parameter GPT, 2 ranks (bench/fsdp_memory.py)."""
    out = {strategy: memory_layout(strategy) for strategy in ("ddp", "fsdp")}
    ddp, fsdp = out["ddp"], out["fsdp"]
    out["train_bytes_ratio"] = fsdp["train_bytes"] / ddp["train_bytes"]
    out["peak_rss_ratio"] = fsdp["peak_rss_bytes"] / ddp["peak_rss_bytes"]
    out["step_time_ratio"] = fsdp["s_per_step"] / ddp["s_per_step"]
    return out


def memory_layout(layout: str, *args: str, nproc: int = 2, env: dict | None = None) -> dict:
    """bench/fsdp_memory.py's figures for one layout ("ddp", "fsdp", "fsdp-tp2"), run under torchrun."""
    proc = subprocess.run(torchrun("-m", "bench.fsdp_memory", layout, *args, nproc=nproc), cwd=REPO,
                          env={**ENV, **(env or {})}, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"bench.fsdp_memory {layout} failed: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def descendants(pid: int) -> dict[int, bytes]:
    """The processes `pid` started, and theirs, with their command lines (Linux /proc; {} where there is none)."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return {}
    found = {}
    for child in children:
        with contextlib.suppress(OSError):
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes()
        found.update(descendants(child))
    return found


def stop(proc: subprocess.Popen) -> None:
    """End torchrun and its ranks. torchrun's ranks run in sessions of their own, so they are found
    first: SIGTERM lets torchrun stop them (SIGTERM, then SIGKILL after 30 s); a rank still running
    after that (it would hold the output pipes open) is killed by its id, if that id still runs the
    same command (ids are reused)."""
    ranks = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid, cmdline in ranks.items():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                os.kill(pid, signal.SIGKILL)


def ranks_json(args: list[str], timeout_s: float) -> tuple[list[dict], str | None]:
    """torchrun of `args` on 2 ranks: the JSON lines rank 0 printed, and what went wrong (None if nothing).
    A run past `timeout_s` (a pipeline schedule that hangs) is stopped with its ranks, keeping the lines
    printed before."""
    proc = subprocess.Popen(torchrun(*args), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        error = None if proc.returncode == 0 else f"exit code {proc.returncode}: {err.strip()[-1500:]}"
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        error = f"timed out after {timeout_s:.0f} s and was stopped (a hang?): {err.strip()[-1000:]}"
    if error:
        print(f"{' '.join(args)}: {error}", file=sys.stderr)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], error


def bench_pipeline(small: bool, timeout_s: float = 600) -> dict:
    """DDP, FSDP and pipeline step time on one GPT and global batch, and the pipeline's bubble (bench/pipeline_step.py),
    one torchrun per case: a case that fails or hangs is reported under "errors" and the others still run."""
    out: dict = {"errors": {}}
    for case in ("ddp", "fsdp", "gpipe", "1f1b"):
        lines, error = ranks_json(["-m", "bench.pipeline_step", case, *(["--small"] if small else [])], timeout_s)
        if error:
            out["errors"][case] = error
        if lines:
            out[case] = lines if case in ("gpipe", "1f1b") else lines[-1]
    return out


def bench_shardsave(small: bool, timeout_s: float = 900) -> dict:
    """Blocked seconds per sharded async save vs a synchronous DCP save, 2 FSDP ranks (bench/shard_save.py)."""
    with tempfile.TemporaryDirectory(prefix="bench-shardsave-", dir="/tmp") as tmp:
        lines, error = ranks_json(["-m", "bench.shard_save", "--dir", tmp, *(["--small"] if small else [])],
                                  timeout_s)
    return {**(lines[-1] if lines else {}), **({"error": error} if error else {})}


def bench_checkpoints() -> dict | None:
    try:
        from bench import checkpoint_bench
    except ImportError:
        return None
    return checkpoint_bench.run()


def bench_vms(repeats: int) -> dict:
    from bench import vm_notice

    return vm_notice.run(repeats)


def bench_slow_rank(recipe: str) -> dict:
    proc = subprocess.run(torchrun("-m", "bench.slow_rank", recipe), cwd=REPO, env=ENV, capture_output=True,
                          text=True, check=True)
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def slow_rank_rows(s: dict) -> list[tuple[str, str, str, str]]:
    return [(f"slow-rank report on vs off (2 ranks, {s['recipe']})", f"{s['with_s_per_step'] * 1e3:.2f} ms",
             f"off {s['without_s_per_step'] * 1e3:.2f} ms",
             f"ratio {s['ratio']:.3f} (median of {len(s['pair_ratios'])} A/B pairs, "
             f"{min(s['pair_ratios']):.2f}-{max(s['pair_ratios']):.2f})"),
            ("slow-rank report's own work, timed alone", f"{s['report_alone_s_per_step'] * 1e6:.1f} us/step",
             f"{s['report_share_of_step'] * 100:.3f}% of a step", "goal <= 1% (clock every step, all-gather "
             "every log interval)")]


def pipeline_rows(p: dict) -> list[tuple[str, str, str, str]]:
    """One row per figure of bench_pipeline: each strategy's step time against DDP's, each schedule's bubble."""
    rows = []
    ddp = p.get("ddp", {}).get("s_per_step")
    measured = [p[c] for c in ("ddp", "fsdp") if c in p] + [p[c][0] for c in ("gpipe", "1f1b") if p.get(c)]
    some = measured[0] if measured else None
    what = f"{some['parameters'] / 1e6:.1f}M-param GPT, batch {some['global_batch']}, 2 ranks" if some else "2 ranks"
    vs_ddp = f"DDP {ddp:.2f} s" if ddp else "DDP failed"
    if "fsdp" in p:
        f = p["fsdp"]["s_per_step"]
        rows.append((f"FSDP vs DDP step time ({what})", f"{f:.2f} s", vs_ddp, f"ratio {f / ddp:.2f}" if ddp else ""))
    for schedule in ("gpipe", "1f1b"):
        cases = p.get(schedule, [])
        if not cases:
            continue
        ms = "/".join(str(c["microbatches"]) for c in cases)
        times = "/".join(f"{c['s_per_step']:.2f}" for c in cases)
        ratios = "/".join(f"{c['s_per_step'] / ddp:.2f}" for c in cases) if ddp else ""
        rows.append((f"pipeline {schedule} vs DDP step time, m={ms}", f"{times} s", vs_ddp, f"ratios {ratios}"))
        rows.append((f"pipeline {schedule} bubble, 2 stages, m={ms}",
                     "measured " + "/".join(f"{c['bubble_measured']:.2f}" for c in cases),
                     "theory " + "/".join(f"{c['bubble_theory']:.2f}" for c in cases),
                     "1 - busy/(fwd+bwd) per stage, mean of stages"))
    for case, error in p.get("errors", {}).items():
        rows.append((f"pipeline bench {case}", "FAILED", error.splitlines()[0][:80], "see bench.json"))
    return rows


def shardsave_rows(s: dict) -> list[tuple[str, str, str, str]]:
    if "ratio" not in s:
        return [("sharded async save vs sync DCP", "FAILED", s.get("error", "no result").splitlines()[0][:80],
                 "see bench.json")]
    return [(f"sharded async save, training blocked ({s['parameters'] / 1e6:.0f}M-param GPT, FSDP 2 ranks)",
             f"{s['async_blocked_s']:.3f} s", f"sync DCP save {s['sync_dcp_save_s']:.2f} s",
             f"ratio {s['ratio']:.3f} (goal <= 0.1); first save {s['async_blocked_first_s']:.3f} s"),
            ("sharded async save, save -> committed", f"{s['async_commit_s']:.2f} s",
             f"{s['shard_bytes_all_ranks'] / 1e6:.0f} MB of shards",
             f"blocked time building the shard state: {s['async_build_shard_state_s']:.3f} s")]


def table(results: dict) -> str:
    rows = []
    a = results.get("step_overhead")
    if a:
        spread = f", pairs {min(a['pair_ratios']):.2f}-{max(a['pair_ratios']):.2f}" if "pair_ratios" in a else ""
        rows.append(("trainer s/step (2 ranks, %s)" % a["recipe"], f"{a['trainer_s_per_step'] * 1e3:.2f} ms",
                     f"plain DDP {a['plain_s_per_step'] * 1e3:.2f} ms",
                     f"ratio {a['ratio']:.3f} (goal <= 1.03; median of {len(a.get('pair_ratios', []))} A/B pairs"
                     f"{spread})"))
    if a and "trainer_extras_s_per_step" in a:
        rows.append(("trainer's own work per step, timed alone", f"{a['trainer_extras_s_per_step'] * 1e3:.3f} ms",
                     f"{a['extras_share_of_plain_step'] * 100:.2f}% of a plain step",
                     "(agreement, LR schedule, checks)"))
    b = results.get("startup")
    if b:
        rows.append(("launch -> first step", f"{b['launcher_s_to_first_step']:.2f} s",
                     f"bare torchrun {b['torchrun_s_to_first_step']:.2f} s",
                     f"ratio {b['launcher_s_to_first_step'] / b['torchrun_s_to_first_step']:.2f}"))
    c = results.get("script")
    if c:
        rows.append(("launcher run SCRIPT -> first step", f"{c['launcher_run_s_to_first_step']:.2f} s",
                     f"bare torchrun {c['torchrun_s_to_first_step']:.2f} s",
                     f"to the end {c['launcher_run_s_total']:.2f} s vs {c['torchrun_s_total']:.2f} s"))
    f = results.get("fsdp")
    if f:
        gib = 2 ** 30
        rows.append((f"FSDP vs DDP per rank ({f['ddp']['parameters'] / 1e6:.0f}M-param GPT, 2 ranks)",
                     f"params+grads+Adam {f['fsdp']['train_bytes'] / gib:.2f} GiB",
                     f"DDP {f['ddp']['train_bytes'] / gib:.2f} GiB",
                     f"ratio {f['train_bytes_ratio']:.3f} (goal <= 0.55); peak RSS ratio {f['peak_rss_ratio']:.2f}"))
        rows.append(("FSDP vs DDP step time (CPU, gloo)", f"{f['fsdp']['s_per_step']:.2f} s",
                     f"DDP {f['ddp']['s_per_step']:.2f} s", f"ratio {f['step_time_ratio']:.2f}"))
    for row in results.get("checkpoint_rows", []):
        rows.append(tuple(row))
    if "pipeline" in results:
        rows += pipeline_rows(results["pipeline"])
    if "shardsave" in results:
        rows += shardsave_rows(results["shardsave"])
    for row in results.get("vms_rows", []) + results.get("vm_shards_rows", []):
        rows.append(tuple(row))
    for row in [*results.get("tp_rows", []), *results.get("bayes_rows", []), *results.get("lm_stack_rows", [])]:
        rows.append(tuple(row))
    if "slow_rank" in results:
        rows += slow_rank_rows(results["slow_rank"])
    if "restarts" in results:
        from bench import slurm_restarts

        rows += slurm_restarts.rows(results["restarts"])
    if "skipped" in results.get("vms", {}):
        rows.append(("VMs over SSH", "SKIPPED", results["vms"]["skipped"], ""))
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="vgg_pretrain")
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--only", choices=["step", "startup", "script", "fsdp", "tp", "checkpoint", "pipeline",
                                           "shardsave", "vms", "vmshards", "bayes", "slowrank", "restarts", "lmstack"],
                        default=None)
    parser.add_argument("--small", action="store_true",
                        help="tiny models in the tp, pipeline and shardsave benches: checks that they run, nothing more")
    args = parser.parse_args()
    results: dict = {"machine": {"cpus": os.cpu_count()}, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.only in (None, "step"):
        results["step_overhead"] = bench_step_overhead(args.recipe)
    if args.only in (None, "startup"):
        results["startup"] = bench_startup(args.startup_repeats)
    if args.only in (None, "script"):
        results["script"] = bench_script(args.startup_repeats)
    if args.only in (None, "fsdp"):
        results["fsdp"] = bench_fsdp()
    if args.only in (None, "tp"):
        from bench import tp_memory

        results["tp"] = tp_memory.run(args.small)
        results["tp_rows"] = tp_memory.rows(results["tp"])
    if args.only in (None, "checkpoint"):
        ckpt = bench_checkpoints()
        if ckpt:
            results["checkpoint"] = ckpt["results"]
            results["checkpoint_rows"] = ckpt["rows"]
    if args.only in (None, "pipeline"):
        results["pipeline"] = bench_pipeline(args.small)
    if args.only in (None, "shardsave"):
        results["shardsave"] = bench_shardsave(args.small)
    if args.only in (None, "vms"):
        vms = bench_vms(args.startup_repeats)
        results["vms"] = vms.get("results", vms)
        if "rows" in vms:
            results["vms_rows"] = vms["rows"]
    if args.only in (None, "vmshards"):
        from bench import vm_sharded

        shards = vm_sharded.run()
        results["vm_shards"] = shards.get("results", shards)
        if "rows" in shards:
            results["vm_shards_rows"] = shards["rows"]
    if args.only in (None, "bayes"):
        from bench import bayes_sweep

        results["bayes"] = bayes_sweep.run()
        results["bayes_rows"] = bayes_sweep.rows(results["bayes"])
    if args.only in (None, "lmstack"):
        from bench import lm_stack

        stack = lm_stack.run()
        results["lm_stack"], results["lm_stack_rows"] = stack["results"], stack["rows"]
    if args.only in (None, "slowrank"):
        results["slow_rank"] = bench_slow_rank(args.recipe)
    if args.only in (None, "restarts"):
        from bench import slurm_restarts

        results["restarts"] = slurm_restarts.run()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.only is not None:
        print(json.dumps(results, indent=2))
    print(table(results))
    print(f"wrote {OUT / 'bench.json'}")


if __name__ == "__main__":
    main()
