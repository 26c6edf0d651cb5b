"""jobs.parallel.pipeline: which stage owns which blocks, a stage's module (names kept, the parts composing to the
whole model), the schedules refused, and a real 2-rank pipeline (torchrun, gloo) trained with GPipe and 1F1B
against one process on the same data and seed.

Run as a script under torchrun, this file is the pipeline's worker (see `_worker`)."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from jobs.gpt import gpt, lm_loss
from jobs.parallel.pipeline import PipelineLayout, build_stage, check_schedule, split_points

REPO = Path(__file__).resolve().parent.parent
STEPS, BATCH, SEQ, MICROBATCHES, CLIP = 4, 8, 16, 4, 0.1
SCHEDULES = {"gpipe": ["layers.2"], "1f1b": None}  # each schedule with one way of choosing the split


def _model(layers: int = 4, seq_len: int = SEQ, tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return gpt(vocab=64, seq_len=seq_len, dim=32, layers=layers, heads=4, mlp_ratio=2, dropout=0.0,
               tied_embeddings=tied)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS training batches and one held-out batch: (STEPS + 1, BATCH, SEQ) inputs and targets."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (STEPS + 1, BATCH, SEQ + 1), generator=gen)
    return tokens[..., :-1], tokens[..., 1:]


def _stage_params(model: nn.Module, owned: list[str]) -> int:
    return sum(p.numel() for u in owned for p in model.get_submodule(u).parameters())


# --- pure tier ---------------------------------------------------------------------------------------------

def test_named_points_give_the_blocks_and_the_parts_around_them() -> None:
    owned = split_points(_model(), ["layers.2"], 2)
    assert owned == [["tok_embeddings", "pos_embeddings", "drop", "layers.0", "layers.1"],
                     ["layers.2", "layers.3", "norm", "output"]]
    owned = split_points(_model(), ["layers.1", "layers.3"], 3)
    assert owned == [["tok_embeddings", "pos_embeddings", "drop", "layers.0"],
                                  ["layers.1", "layers.2"], ["layers.3", "norm", "output"]]


@pytest.mark.parametrize("layers,stages,seq_len", [(4, 2, SEQ), (4, 2, 2048), (6, 3, SEQ), (5, 4, 512)])
def test_balanced_split_has_the_smallest_largest_stage(layers: int, stages: int, seq_len: int) -> None:
    """Brute force over every contiguous split: none has a smaller largest stage (in parameters)."""
    model = _model(layers, seq_len)
    owned = split_points(model, None, stages)
    assert [u for o in owned for u in o if u.startswith("layers.")] == [f"layers.{i}" for i in range(layers)]
    assert all(any(u.startswith("layers.") for u in o) for o in owned)
    got = max(_stage_params(model, o) for o in owned)
    blocks = [f"layers.{i}" for i in range(layers)]
    best = min(max(_stage_params(model, o) for o in split_points(model, [blocks[c] for c in cuts], stages))
               for cuts in itertools.combinations(range(1, layers), stages - 1))
    assert got == best


def test_a_heavy_first_part_gets_fewer_blocks() -> None:
    # 2048 positions x 32 make the embeddings weigh as much as 8 blocks: the first stage keeps one block
    owned = split_points(_model(4, 2048), None, 2)
    assert [u for u in owned[0] if u.startswith("layers.")] == ["layers.0"]


@pytest.mark.parametrize("points,stages,message", [
    (["layers.9"], 2, "'layers.9' is not a block a stage can start at; valid points: layers.1, layers.2, layers.3"),
    (["norm"], 2, "'norm' is not a block"),
    (["layers.0"], 2, "'layers.0' is not a block"),
    (["layers.1"], 3, "3 pipeline stages need 2 split points, got 1"),
    (["layers.3", "layers.1"], 3, "distinct and in the model's order"),
    (["layers.2", "layers.2"], 3, "distinct and in the model's order"),
    (None, 5, "5 pipeline stages but the model has 4 blocks"),
    (None, 0, "at least 1 stage"),
])
def test_bad_splits_are_refused(points: list[str] | None, stages: int, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        split_points(_model(), points, stages)


def test_a_model_without_one_block_dict_is_refused() -> None:
    with pytest.raises(ValueError, match="exactly one top-level nn.ModuleDict"):
        split_points(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), None, 2)


def test_stages_keep_the_full_names_and_compose_to_the_whole_model() -> None:
    model, (x, _) = _model().eval(), _data()
    owned = split_points(model, ["layers.1", "layers.3"], 3)
    stages = [build_stage(model, i, 3, o, torch.device("cpu")) for i, o in enumerate(owned)]
    names = [set(s.state_dict()) for s in stages]
    assert set().union(*names) == set(model.state_dict())
    assert all(not a & b for a, b in itertools.combinations(names, 2))
    for stage in stages:  # same names, same tensors (copies: the model itself is untouched)
        for name, value in stage.state_dict().items():
            assert torch.equal(value, model.state_dict()[name])
    assert len(model.layers) == 4 and model.output is not None
    with torch.no_grad():
        hidden = x[0]
        for stage in stages:
            hidden = stage(hidden)
        assert torch.allclose(hidden, model(x[0]), atol=1e-6)


def test_tied_embeddings_split_across_stages_are_refused() -> None:
    model = _model(tied=True)
    owned = split_points(model, ["layers.2"], 2)
    for index in (0, 1):
        with pytest.raises(ValueError, match="tok_embeddings.weight is tied to output.weight|output.weight "
                                             "is tied to tok_embeddings.weight"):
            build_stage(model, index, 2, owned[index], torch.device("cpu"))
    # on one stage the tie stays whole, and stays a tie
    whole = build_stage(model, 0, 1, split_points(model, None, 1)[0], torch.device("cpu"))
    assert whole.output.weight is whole.tok_embeddings.weight


def test_stage_owning_what_the_model_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match=r"owns \['layers.7'\]"):
        build_stage(_model(), 0, 2, ["layers.0", "layers.7"], torch.device("cpu"))


def test_only_single_stage_schedules_run() -> None:
    assert check_schedule("gpipe", "cpu").__name__ == "ScheduleGPipe"
    assert check_schedule("1f1b", "cpu").__name__ == "Schedule1F1B"
    with pytest.raises(ValueError, match="gloo hangs were fixed only for the single-stage schedules"):
        check_schedule("interleaved_1f1b", "cpu")
    with pytest.raises(ValueError, match="zbv_zero_bubble.*not supported on cuda"):
        check_schedule("zbv_zero_bubble", "cuda")
    with pytest.raises(ValueError, match="unknown pipeline schedule 'gpip'; valid: gpipe, 1f1b"):
        check_schedule("gpip", "cpu")



def test_layout_puts_a_stages_replicas_on_neighbouring_ranks() -> None:
    """(pp, dp) with pp outermost: 4 ranks = 2 stages x 2 replicas are stage 0 on ranks 0, 1 and stage 1 on
    2, 3; replica r of every stage reads the same share of the data."""
    coords = [(lay.stage, lay.replica) for lay in (PipelineLayout.of(2, r, 4) for r in range(4))]
    assert coords == [(0, 0), (0, 1), (1, 0), (1, 1)]
    third = PipelineLayout.of(3, 4, 6)  # 3 stages x 2 replicas: rank 4 is stage 2, replica 0
    assert (third.stage, third.replica) == (2, 0)
    assert third.replica_ranks() == [4, 5] and third.stage_ranks() == [0, 2, 4]
    one = PipelineLayout.of(2, 1, 2)  # one replica: a stage per rank, as before
    assert (one.stage, one.replica, one.replicas) == (1, 0, 1) and one.stage_ranks() == [0, 1]
    with pytest.raises(ValueError, match="3 pipeline stages do not divide 4 ranks"):
        PipelineLayout.of(3, 0, 4)

# --- two real ranks ----------------------------------------------------------------------------------------

def _train_one_process() -> dict:
    """The reference: the whole model, the whole batch, the same optimizer and clipping."""
    model, (x, y) = _model(), _data()
    with torch.no_grad():
        eval_before = lm_loss(model(x[STEPS]), y[STEPS]).item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = lm_loss(model(x[step]), y[step])
        loss.backward()
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(x[STEPS])
    return {"losses": losses, "norms": norms, "state": model.state_dict(), "logits": logits,
            "eval_loss": lm_loss(logits, y[STEPS]).item(), "eval_before": eval_before}


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun of 2 ranks trains with each schedule in turn (one start-up for both tests)."""
    out = tmp_path_factory.mktemp("pipeline")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(out), str(STEPS)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_two_stage_pipeline_trains_as_one_process(pipeline_runs: Path, schedule: str) -> None:
    ref = _train_one_process()
    assert ref["norms"][0] > CLIP  # the clipping bites, so a stage clipping by its own norm would differ
    ranks = [torch.load(pipeline_runs / f"{schedule}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:  # every stage logs the batch's loss, broadcast from the last
        assert rank["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert rank["norms"] == pytest.approx(ref["norms"], abs=1e-5)
        assert rank["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
        assert rank["eval_before"] == pytest.approx(ref["eval_before"], abs=1e-5)
        assert rank["uneven_batch_refused"]
    assert ranks[0]["logits"] is None
    assert torch.allclose(ranks[1]["logits"], ref["logits"], atol=1e-5)
    first, last = ranks[0]["state"], ranks[1]["state"]
    assert not set(first) & set(last) and set(first) | set(last) == set(ref["state"])
    for name, value in {**first, **last}.items():
        assert torch.allclose(value, ref["state"][name], atol=1e-5), name
    assert not torch.allclose(ref["state"]["output.weight"], _model().state_dict()["output.weight"])


def _worker(out: Path, steps: int) -> None:
    """One rank of the pipeline: for each schedule, train `steps` steps and evaluate one batch, then save
    what the test compares."""
    import torch.distributed as dist

    from jobs.parallel.pipeline import PipelineLayout, PipelineRunner, clip_grad_norm_

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    layout = PipelineLayout.of(2, rank, 2).with_groups("cpu")
    x, y = _data()
    for schedule, points in SCHEDULES.items():
        model = _model()
        owned = split_points(model, points, 2)
        stage = build_stage(model, rank, 2, owned[rank], torch.device("cpu"))
        runner = PipelineRunner(stage, layout, schedule, MICROBATCHES, lm_loss)
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
        # evaluation first, as a trainer may: the stage's shapes are then inferred without gradients
        eval_before = runner.eval_step(x[STEPS], y[STEPS])[0].item()
        losses, norms, seconds = [], [], []
        for step in range(steps):
            start = time.perf_counter()
            opt.zero_grad()
            losses.append(runner.train_step(x[step % STEPS], y[step % STEPS]).item())
            norms.append(float(clip_grad_norm_(stage, CLIP, runner.group)))
            opt.step()
            seconds.append(time.perf_counter() - start)
        eval_loss, logits = runner.eval_step(x[STEPS], y[STEPS])
        try:
            runner.train_step(x[0, :7], y[0, :7])
            uneven_refused = False
        except ValueError:
            uneven_refused = True
        torch.save({"losses": losses, "norms": norms, "eval_loss": eval_loss.item(), "logits": logits,
                    "eval_before": eval_before,
                    "state": stage.state_dict(), "seconds": seconds, "uneven_batch_refused": uneven_refused},
                   out / f"{schedule}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
