"""The GPT language model (jobs/gpt.py), its byte corpus of the standard library (jobs/text.py) and the
gpt_small recipe. Tier 1: the model's layout (names that survive a pipeline split, tied weights,
causality, a stage holding some layers), the loss and metric as evaluation sums them, the split by file.
Tier 2 (slow): the recipe on 2 DDP ranks through the CLI learns, and a run stopped by SIGTERM and
relaunched ends with the weights of an uninterrupted one."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, final_params, max_logged_step, read_result, run_cli, wait_until
from jobs.gpt import Block, bits_per_byte, gpt, lm_loss
from jobs.text import ByteWindows, python_sources, read_corpus, source_files, stdlib_folder
from jobs.training.objective import batch_sum

SMALL = dict(seq_len=16, dim=32, layers=4, heads=4)


def _model(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)  # as the trainer does before it builds the model
    return gpt(**{**SMALL, **kwargs})


def _tokens(batch: int = 3, steps: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, steps), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the model
def test_logits_shape_and_shorter_sequences() -> None:
    model = _model().eval()
    assert model(_tokens()).shape == (3, 16, 256)
    assert model(_tokens(2, 5)).shape == (2, 5, 256)
    with pytest.raises(ValueError, match="longer than the model's seq_len"):
        model(_tokens(1, 17))


def test_blocks_are_indexed_by_name_in_a_module_dict() -> None:
    model = _model()
    assert isinstance(model.layers, nn.ModuleDict) and list(model.layers) == ["0", "1", "2", "3"]
    assert all(isinstance(block, Block) for block in model.layers.values())
    names = set(model.state_dict())
    assert {"tok_embeddings.weight", "pos_embeddings.weight", "norm.weight", "output.weight",
            "layers.3.attn.q.weight", "layers.3.attn.v.weight", "layers.3.mlp.proj.weight"} <= names
    prefixes = {"tok_embeddings", "pos_embeddings", "layers", "norm", "output"}
    assert {name.split(".")[0] for name in names} == prefixes
    assert {name.split(".")[1] for name in names if name.startswith("layers.")} == {"0", "1", "2", "3"}


def test_tied_embeddings_share_one_tensor_and_keep_both_names() -> None:
    tied, untied = _model(), _model(tied_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    assert set(tied.state_dict()) == set(untied.state_dict())  # the keys do not depend on the tying
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 256 * 32


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = _model(seed=3).state_dict(), _model(seed=3).state_dict(), _model(seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.q.weight"], c["layers.0.attn.q.weight"])


def test_causal_a_token_changes_no_earlier_logit() -> None:
    model, x = _model().eval(), _tokens()
    changed = x.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_stages_holding_some_layers_compose_to_the_whole_model() -> None:
    """A pipeline split as torchtitan makes it: each stage a copy with what it does not own deleted."""
    model, x = _model(tied_embeddings=False).eval(), _tokens()
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["2"], first.layers["3"]
    first.norm, first.output = None, None
    del last.layers["0"], last.layers["1"]
    last.tok_embeddings, last.pos_embeddings = None, None
    with torch.no_grad():
        hidden = first(x)
        assert hidden.shape == (3, 16, 32)
        assert torch.allclose(last(hidden), model(x), atol=1e-6)
    # each stage's names are the whole model's: a checkpoint does not depend on the split
    assert set(first.state_dict()) | set(last.state_dict()) == set(model.state_dict())
    assert not set(first.state_dict()) & set(last.state_dict())


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="divisible by model.kwargs.heads"):
        gpt(dim=30, heads=4)


# ----------------------------------------------------------------------------- loss and metric
def test_uniform_guess_costs_ln256_nats_and_8_bits_per_byte() -> None:
    logits, y = torch.zeros(2, 5, 256), _tokens(2, 5)
    assert lm_loss(logits, y).item() == pytest.approx(math.log(256))
    assert bits_per_byte(logits, y).tolist() == pytest.approx([8.0, 8.0])


def test_evaluation_sums_give_the_mean_over_every_token() -> None:
    """Evaluation adds batch_sum() over batches of different sizes and divides by the samples: the loss
    (a batch mean) and bits per byte (per sample) must both come out as the mean over all tokens."""
    logits, y = torch.randn(7, 6, 256, generator=torch.Generator().manual_seed(2)), _tokens(7, 6)
    loss_sum = batch_sum(lm_loss(logits[:3], y[:3]), 3) + batch_sum(lm_loss(logits[3:], y[3:]), 4)
    bpb_sum = batch_sum(bits_per_byte(logits[:3], y[:3]), 3) + batch_sum(bits_per_byte(logits[3:], y[3:]), 4)
    whole = lm_loss(logits, y).item()
    assert (loss_sum / 7).item() == pytest.approx(whole, rel=1e-6)
    assert (bpb_sum / 7).item() == pytest.approx(whole / math.log(2), rel=1e-6)


# ----------------------------------------------------------------------------- the corpus
def test_windows_are_input_and_target_shifted_by_one() -> None:
    data = torch.arange(23, dtype=torch.uint8)
    windows = ByteWindows(data, seq_len=5)
    assert len(windows) == 4  # (23 - 1) // 5: the last window ends at byte 21
    x, y = windows[2]
    assert x.tolist() == [10, 11, 12, 13, 14] and y.tolist() == [11, 12, 13, 14, 15]
    assert x.dtype == y.dtype == torch.long
    with pytest.raises(IndexError):
        windows[4]


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text)
    return root


def test_installation_specific_folders_are_left_out(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"a.py": b"a", "pkg/b.py": b"b", "pkg/test/c.py": b"c", "c.txt": b"x",
                            "site-packages/numpy/d.py": b"d", "test/e.py": b"e"})
    assert source_files(root) == ["a.py", "pkg/b.py", "pkg/test/c.py"]


def test_split_is_by_whole_file_and_every_byte_read_comes_from_its_split(tmp_path: Path) -> None:
    files = {f"m{i:02d}.py": bytes([65 + i]) * 40 for i in range(30)}  # file i is 40 bytes of one letter
    root = _tree(tmp_path, files)
    corpus = read_corpus(str(root), 10_000, 0.3, 0)  # budget above the 1,200 bytes: every file is read
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert sorted(corpus.train_files + corpus.val_files) == sorted(files)
    assert bytes(corpus.val.tolist()) == b"".join(files[f] for f in corpus.val_files)
    assert bytes(corpus.train.tolist()) == b"".join(files[f] for f in corpus.train_files)
    assert 3 <= len(corpus.val_files) <= 15  # about 30% of 30 files
    other = read_corpus(str(root), 10_000, 0.3, 1)
    assert set(other.val_files) != set(corpus.val_files)  # the seed draws another split


def test_max_bytes_caps_each_split(tmp_path: Path) -> None:
    root = _tree(tmp_path, {f"m{i:02d}.py": b"x" * 100 for i in range(30)})
    corpus = read_corpus(str(root), 1_000, 0.2, 0)
    assert (len(corpus.train), len(corpus.val)) == (800, 200)


def test_stdlib_corpus_is_deterministic_and_split_by_file() -> None:
    train, val = python_sources(seq_len=64, max_bytes=300_000, val_fraction=0.1, seed=0)
    corpus = read_corpus(str(Path(stdlib_folder()).resolve()), 300_000, 0.1, 0)
    read_corpus.cache_clear()  # a second process reading from disk again
    again = read_corpus(str(Path(stdlib_folder()).resolve()), 300_000, 0.1, 0)
    assert again is not corpus
    assert (again.train_files, again.val_files) == (corpus.train_files, corpus.val_files)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    assert corpus.val_files and not set(corpus.train_files) & set(corpus.val_files)
    assert (len(corpus.train), len(corpus.val)) == (270_000, 30_000)
    assert all(not f.startswith(("site-packages/", "test/")) for f in corpus.train_files + corpus.val_files)
    assert (len(train), len(val)) == ((270_000 - 1) // 64, (30_000 - 1) // 64)
    x, y = train[5]
    assert torch.equal(x, corpus.train[320:384].long()) and torch.equal(y, corpus.train[321:385].long())


@pytest.mark.slow
def test_every_process_reads_the_same_corpus() -> None:
    """Each rank builds the corpus itself: processes with differently salted hash() must agree."""
    code = ("import hashlib; from jobs.text import python_sources; t, v = python_sources(64, 100_000); "
            "print(hashlib.sha256(t.data.numpy().tobytes() + v.data.numpy().tobytes()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": str(REPO)}).stdout
               for salt in ("1", "2")}
    train, val = python_sources(64, 100_000)
    assert digests == {hashlib.sha256(train.data.numpy().tobytes() + val.data.numpy().tobytes()).hexdigest() + "\n"}


# ----------------------------------------------------------------------------- the recipe, 2 DDP ranks
# Shortened: a smaller model and corpus, 24 steps; checkpoints every 8 steps for the resume test.
SHORT = ["trainer.max_steps=24", "trainer.eval_every=24", "trainer.global_batch=16", "trainer.micro_batch=8",
         "model.kwargs.dim=64", "model.kwargs.layers=2", "model.kwargs.seq_len=64", "data.kwargs.seq_len=64",
         "data.kwargs.max_bytes=200000", "checkpoint.every_steps=8", "logging.log_every=1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("gpt")
    run_cli("launch", "gpt_small", *SHORT, "--run-name", "straight", runs_dir=runs, check=True,
            env={"XDG_CACHE_HOME": str(runs / "cache")})  # the CPU peak's cache: here, not the user's
    return runs / "straight"


@pytest.mark.slow
def test_recipe_learns_on_two_ddp_ranks(straight: Path) -> None:
    result = read_result(straight)
    assert result["outcome"] == "completed" and result["step"] == 24, result
    assert result["val/loss"] < 0.75 * math.log(256), result  # a uniform guess is ln(256) = 5.55 nats
    # the loss (a batch mean) and bits per byte (per sample) summed over the validation set by evaluation
    assert result["val/bpb"] == pytest.approx(result["val/loss"] / math.log(2), rel=1e-5)
    log = (straight / "logs" / "rank0.log").read_text()
    assert "micro batch 8 x accumulation 1 x 2 ranks = 16" in log
    weights = final_params(straight)
    assert {"layers.0.attn.k.weight", "layers.1.mlp.fc.weight", "output.weight"} <= set(weights)


@pytest.mark.slow
def test_every_log_line_carries_throughput_mfu_and_peak_memory(straight: Path) -> None:
    """Through the CLI on 2 ranks (jobs.training.throughput): tokens/s is samples/s x 64 tokens, MFU is in
    (0, 1] against the CPU peak the rank probed and cached, and `launcher status` shows the newest line."""
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    lines = {row["step"]: row for row in rows if "train/loss" in row}
    assert sorted(lines) == list(range(1, 25))
    assert "samples_per_s" not in lines[1]  # the first step of the process: compile and warm-up
    for step in range(2, 25):
        row = lines[step]
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 64), row
        assert 0 < row["mfu"] <= 1 and row["tflops_per_device"] > 0 and row["peak_rss_gb"] > 0.05, row
    assert json.loads((straight.parent / "cache" / "torchferry" / "cpu_peak.json").read_text())
    log = (straight / "logs" / "rank0.log").read_text()
    assert "first step took" in log and "per token; peak: CPU" in log
    assert re.search(r"step 24 epoch \d+: train/loss [\d.]+ lr \S+ tok/s [\d,]+ TFLOP/s \S+ MFU [\d.]+% peak RSS", log)
    status = run_cli("status", "straight", runs_dir=straight.parent, check=True).stdout
    shown = f"throughput: {lines[24]['tokens_per_s']:,.0f} tok/s"
    assert shown in status and f"MFU {100 * lines[24]['mfu']:.2f}%" in status and "(step 24)" in status, status


@pytest.mark.slow
def test_sigterm_and_relaunch_ends_with_the_uninterrupted_weights(straight: Path, runs_dir: Path) -> None:
    seed = int(os.environ.get("RESUME_SEED", "0"))
    target = random.Random(f"{seed}-gpt").randint(9, 15)  # between the checkpoints of steps 8 and 16
    print(f"stopping near step {target} (RESUME_SEED={seed}; set it to draw other steps)")
    cmd = [sys.executable, "-m", "launcher", "launch", "gpt_small", *SHORT, "--run-name", "cut",
           "--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def reached() -> bool:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""  # it ended before the step
        return max_logged_step(runs_dir / "cut") >= target

    wait_until(reached, f"run cut to reach step {target}", timeout=180, poll=0.02)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher forwards it to torchrun, which forwards it to every rank
    out = proc.communicate(timeout=120)[0]
    stopped = read_result(runs_dir / "cut")
    assert stopped["outcome"] == "preempted" and target <= stopped["step"] < 24, (stopped, out)

    run_cli("launch", "gpt_small", *SHORT, "--run-name", "cut", runs_dir=runs_dir, check=True)
    assert "resumed from" in (runs_dir / "cut" / "logs" / "rank0.log").read_text()
    assert read_result(runs_dir / "cut")["outcome"] == "completed"
    expected, got = final_params(straight), final_params(runs_dir / "cut")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after the resume"
