"""`launcher doctor` on a script's own failure (issue #22, point 6): a traceback in any rank's log, whatever
prefixes its lines carry, named by its exception line and the user's own file:line, with the fix for the
failures every new user meets (a CUDA call without a GPU, NCCL on the CPU, torchrun's variables missing).

The recorded run is nanoGPT's `train.py` under `launcher run` on a CPU-only Slurm node, as issue #22 saw it:
`torch.cuda.set_device` (train.py line 85) fails on both ranks; in the Slurm job's output every line carries
torch's `[rankN]:` behind the console's `[rankN] `, and the two ranks' lines interleave."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, user_cli
from launcher.doctor.diagnose import diagnose
from launcher.doctor.findings import render_findings
from launcher.doctor.records import read_run
from launcher.doctor.tracebacks import last_by_rank, split_prefixes, user_frame
from jobs.schema.run_dir import Run

CODE = "/home/ana/nanoGPT"
SITE = f"{CODE}/.venv/lib/python3.11/site-packages"  # a virtualenv inside the project: not the user's code
START = f"launcher: rank {{rank}} of 2 on cpu-node-03 (local rank {{rank}}), run /home/ana/runs/shakespeare: " \
        f"{CODE}/train.py config/train_shakespeare_char.py --device=cpu --compile=False --backend=gloo"
NANOGPT_OUTPUT = """\
Overriding config with config/train_shakespeare_char.py:
# train a miniature character-level shakespeare model
Overriding: device = cpu
Overriding: compile = False
Overriding: backend = gloo"""
TRACEBACK = f"""\
Traceback (most recent call last):
  File "{CODE}/train.py", line 85, in <module>
    torch.cuda.set_device(device)
  File "{SITE}/torch/cuda/__init__.py", line 689, in set_device
    torch._C._cuda_setDevice(device)
    ^^^^^^^^^^^^^^^^^^^^^^^^
AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'"""
TORCHRUN = """\
E1207 06:58:02.118000 40211 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "/home/ana/launcher/jobs/torchrun.py", line 26, in main
    torchrun_main()
  File "/home/ana/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
srun: error: cpu-node-03: task 0: Exited with exit code 1"""


def _prefixed(text: str, *prefixes: str) -> list[str]:
    return ["".join(prefixes) + line for line in text.splitlines()]


def _interleaved(rank_lines: dict[int, list[str]]) -> list[str]:
    """The ranks' lines one after the other, as two processes writing to one console produce them."""
    out, longest = [], max(map(len, rank_lines.values()))
    for i in range(longest):
        out += [lines[i] for lines in rank_lines.values() if i < len(lines)]
    return out


def nanogpt_run(root: Path, where: str) -> Run:
    """The run directory of the recorded failure; `where`: "logs" (each rank's log holds its traceback, with
    torch's prefix) or "job_output" (only the Slurm job's output has them: doubled prefixes, interleaved)."""
    folder = root / "shakespeare"
    (folder / "logs").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({
        "run_name": "shakespeare", "recipe": "train", "backend": "slurm", "state": "failed", "exit_code": 1,
        "failed_rank": 1, "code_dir": CODE, "job_id": "7301", "job_ids": ["7301"]}))
    (folder / "config.yaml").write_text(f"name: train\nscript:\n  path: {CODE}/train.py\n")
    for rank in (0, 1):
        lines = [START.format(rank=rank), *NANOGPT_OUTPUT.splitlines()]
        if where == "logs":
            lines += _prefixed(TRACEBACK, f"[rank{rank}]: ")
        (folder / "logs" / f"rank{rank}.log").write_text("\n".join(lines) + "\n")
    console = _interleaved({rank: _prefixed(NANOGPT_OUTPUT + "\n" + TRACEBACK, f"[rank{rank}] ", f"[rank{rank}]: ")
                            for rank in (1, 0)})
    (folder / "slurm-7301.out").write_text("\n".join(console + TORCHRUN.splitlines()) + "\n")
    return Run("shakespeare", folder)


@pytest.mark.parametrize("where", ["logs", "job_output"])
def test_recorded_nanogpt_cuda_failure_names_the_error_the_line_and_the_fix(tmp_path: Path, where: str) -> None:
    found = diagnose(read_run(nanogpt_run(tmp_path, where)))
    said = render_findings("shakespeare", found)
    failures = [f for f in found if f.failure]
    assert len(failures) == 1, said  # both ranks failed the same way: one finding that names them
    assert failures[0].what == ("a CUDA call on a machine without a GPU on ranks 0, 1: AttributeError: module "
                                "'torch._C' has no attribute '_cuda_setDevice' at train.py:85"), said
    assert "torch.cuda.is_available() else 'cpu'" in failures[0].fix and "--cluster" in failures[0].fix
    evidence = [line.where for line in failures[0].evidence]
    if where == "logs":
        assert evidence == ["logs/rank1.log:13", "logs/rank1.log:8"], evidence  # rank 1 failed first (run.json)
    else:
        assert evidence == ["slurm-7301.out:23", "slurm-7301.out:13"], evidence
    assert "killer" not in said and "no rank logged an error" not in said and "ChildFailedError" not in said


# A traceback in each form a log may give it: the exception to report is the chain's last one, raised in the
# user's model.py (called from train.py, calling into torch and the launcher's own runtime API).
CHAINED = f"""\
Traceback (most recent call last):
  File "{CODE}/train.py", line 40, in <module>
    rank = int(os.environ["RANK"])
  File "<frozen os>", line 679, in __getitem__
KeyError: 'RANK'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "{CODE}/train.py", line 43, in <module>
    model = build(cfg)
  File "{CODE}/model.py", line 12, in build
    return Net(cfg).to(cfg.device)
  File "{REPO}/jobs/runtime.py", line 30, in checkpoint
    raise ValueError("no run")
  File "{SITE}/torch/nn/modules/module.py", line 1355, in to
    return self._apply(convert)
ValueError: cfg.device is 'tpu'
with a second line of message"""
PREFIXES = {
    "none": (),
    "torch": ("[rank1]: ",),
    "doubled": ("[rank1] ", "[rank1]: "),
    "tee timestamp": ("2026-12-07 06:58:02,118 ", "[rank1]: "),
    "logging": ("2026-12-07T06:58:02Z ERROR - ",),
    "ts and srun": ("Dec  7 06:58:02 ", "1: "),
}


@pytest.mark.parametrize("style", sorted(PREFIXES))
def test_chained_traceback_under_any_prefix_gives_the_last_exception_and_the_users_line(tmp_path: Path,
                                                                                      style: str) -> None:
    folder = tmp_path / "chained"
    (folder / "logs").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"state": "failed", "exit_code": 1, "code_dir": CODE}))
    text = "\n".join(["started", *_prefixed(CHAINED, *PREFIXES[style]), "after it"]) + "\n"
    (folder / "logs" / "rank1.log").write_text(text)
    records = read_run(Run("chained", folder))
    (tb,) = last_by_rank(records)
    assert (tb.rank, tb.said) == (1, "ValueError: cfg.device is 'tpu'")
    assert user_frame(tb, CODE).where == f"{CODE}/model.py:12"  # not torch's, not the launcher's runtime.py
    (finding,) = diagnose(records)
    assert finding.what == "rank 1 failed: ValueError: cfg.device is 'tpu' at model.py:12", finding
    assert "launcher logs chained --rank 1" in finding.fix


def test_prefixes_peel_off_and_keep_the_indentation() -> None:
    assert split_prefixes('[rank1] [rank1]:   File "train.py", line 85') == (1, '  File "train.py", line 85')
    assert split_prefixes("[rank0]:[E626 06:24:44.906 ProcessGroupNCCL.cpp:616] x") == (0, "x")
    assert split_prefixes("RuntimeError: ERROR 3") == (None, "RuntimeError: ERROR 3")


@pytest.mark.parametrize("said, what, fix", [
    ("RuntimeError: ProcessGroupNCCL is only supported with GPUs, no GPUs found!", "NCCL, the GPU backend",
     "backend gloo"),
    ("RuntimeError: Distributed package doesn't have NCCL built in", "NCCL, the GPU backend", "backend gloo"),
    ("ValueError: Error initializing torch.distributed using env:// rendezvous: environment variable MASTER_ADDR "
     "expected, but not set", "the script was started without torchrun's variables", "launcher run train.py"),
    ("KeyError: 'RANK'", "the script was started without torchrun's variables", "not `python train.py`"),
    ("AssertionError: Torch not compiled with CUDA enabled", "a CUDA call on a machine without a GPU", "'cpu'"),
    ("RuntimeError: No CUDA GPUs are available", "a CUDA call on a machine without a GPU", "'cpu'"),
])
def test_common_script_failures_get_their_fix(tmp_path: Path, said: str, what: str, fix: str) -> None:
    folder = tmp_path / "one"
    (folder / "logs").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"state": "failed", "exit_code": 1, "code_dir": CODE}))
    tb = TRACEBACK.replace("AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'", said)
    (folder / "logs" / "rank0.log").write_text("\n".join(_prefixed(tb, "[rank0]: ")) + "\n")
    (finding,) = diagnose(read_run(Run("one", folder)))
    assert finding.what.startswith(what) and f"on rank 0: {said} at train.py:85" in finding.what, finding
    assert fix in finding.fix


TINY = '''\
import torch
import torch.distributed as dist

dist.init_process_group("gloo")  # from here on torch prefixes an uncaught exception's lines with [rankN]:
dist.barrier()
torch.cuda.set_device(0)
'''


@pytest.mark.slow
def test_real_script_calling_cuda_on_this_cpu_machine(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: torch.cuda.set_device(0) works")
    project, runs = tmp_path / "project", tmp_path / "runs"
    project.mkdir()
    (project / "train.py").write_text(TINY)
    proc = user_cli(project, "run", "train.py", "--procs-per-node", "2", "--run-name", "tiny", "--runs-dir", str(runs))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doctor = user_cli(project, "doctor", "tiny", "--runs-dir", str(runs))
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr, doctor.stdout + doctor.stderr
    out = doctor.stdout
    # both ranks fail at once; torchrun may stop the second before its traceback is out: one or both named
    assert out.startswith("FAILURE: a CUDA call on a machine without a GPU on rank"), out
    assert "_cuda_setDevice' at train.py:6\n" in out and out.count("FAILURE") == 1, out
    assert "FIX: use the device torch finds (device = 'cuda' if torch.cuda.is_available() else 'cpu'" in out
    assert "killer" not in out


LOST = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.3]:4471"


def test_recorded_script_out_of_memory_names_the_users_line_and_a_fix_for_a_script(tmp_path: Path) -> None:
    """The trainer's fix (trainer.micro_batch=auto) means nothing to a script: it sizes its own batches."""
    run = nanogpt_run(tmp_path, "logs")
    oom = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
           "79.19 GiB of which 1.06 GiB is free.")
    for rank in (0, 1):
        log = run.dir / "logs" / f"rank{rank}.log"
        log.write_text(log.read_text().replace("AttributeError: module 'torch._C' has no attribute "
                                               "'_cuda_setDevice'", oom if rank == 0 else LOST))
    (failure,) = [f for f in diagnose(read_run(run)) if f.failure]
    assert failure.what == "out of memory on the GPU on rank 0: tried to allocate 2.00 GiB at train.py:85", failure
    assert "smaller batch size" in failure.fix and "trainer.micro_batch" not in failure.fix
    assert [line.where for line in failure.evidence] == ["logs/rank0.log:13", "logs/rank0.log:8"]


@pytest.mark.parametrize("state", ["completed", "cancelled"])
def test_a_traceback_the_run_survived_is_no_failure(tmp_path: Path, state: str) -> None:
    """A script that printed a traceback and carried on (or a Ctrl-C's KeyboardInterrupt): nothing wrong."""
    folder = tmp_path / "fine"
    (folder / "logs").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"state": state, "code_dir": CODE}))
    (folder / "logs" / "rank0.log").write_text("\n".join(_prefixed(TRACEBACK, "[rank0]: ")) + "\ndone\n")
    assert diagnose(read_run(Run("fine", folder))) == []
