"""The host copy of a rank's shard (jobs/checkpoint/shard_staging.py): the staged tree is the source bit
for bit, DTensor specs kept, and DCP writes the same files from it as from the live state; buffers are
reused by the next save and replaced when a shape or dtype changes; a big tensor cut across threads
is copied to its last element; a buffer still being written is never rewritten. One process, a
1-rank gloo group for the DTensors."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from jobs.checkpoint.shard_staging import ShardStager, copy_threads, deal

ODD = 786_433  # float32 elements: 3 MB, a prime, so 1 MiB pieces leave a short tail


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _shard(mesh: Any) -> dict[str, Any]:
    """What model_shard/optimizer_shard give DCP on an FSDP rank, and the odd cases around it."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(ODD, generator=g)
    return {
        "model": {"big": distribute_tensor(weight, mesh, [Shard(0)]),
                  "w": distribute_tensor(torch.randn(6, 4, generator=g), mesh, [Shard(0)]),
                  "half": torch.randn(5, 3, generator=g).to(torch.bfloat16),
                  "transposed": torch.randn(4, 7, generator=g).t(),  # not contiguous: copied whole
                  "empty": torch.empty(0, 3)},
        "optimizer": {"state.big.step": torch.tensor(3.0), "state.big.exp_avg": torch.randn(ODD, generator=g),
                      "param_groups.big.lr": 1e-3, "param_groups.big.betas": (0.9, 0.95),
                      "param_groups.big.params": ["big"]},
    }


def _leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{path}.{k}")
    else:
        yield path, tree


def _assert_same(staged: Any, source: Any) -> None:
    assert [p for p, _ in _leaves(staged)] == [p for p, _ in _leaves(source)]
    for (path, got), (_, want) in zip(_leaves(staged), _leaves(source)):
        assert type(got) is type(want), path
        if isinstance(want, DTensor):
            assert got._spec == want._spec and got._local_tensor.device.type == "cpu", path
            got, want = got._local_tensor, want._local_tensor
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and got.shape == want.shape, path
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), path
            assert got.data_ptr() != want.data_ptr() or got.numel() == 0, f"{path} not copied"
        else:
            assert got == want, path


@pytest.mark.parametrize("threads", [1, 3])
def test_the_staged_shard_is_the_source_and_dcp_writes_the_same_files(mesh: Any, tmp_path: Path,
                                                                      threads: int) -> None:
    """3 threads cut the 3 MB tensors into 1 MiB pieces: a cut that loses the tail fails here."""
    source = _shard(mesh)
    stager = ShardStager(threads)
    staged = stager.stage(source)
    _assert_same(staged, source)
    dcp.save(source, checkpoint_id=str(tmp_path / "live"))
    dcp.save(staged, checkpoint_id=str(tmp_path / "staged"))
    assert {p.name for p in (tmp_path / "staged").iterdir()} == {".metadata", "__0_0.distcp"}
    assert (tmp_path / "live" / "__0_0.distcp").read_bytes() == (tmp_path / "staged" / "__0_0.distcp").read_bytes()
    live, ours = (dcp.FileSystemReader(tmp_path / d).read_metadata() for d in ("live", "staged"))
    # the index is the same but for storage_meta (the folder and a random save id)
    assert (live.state_dict_metadata, live.planner_data, live.storage_data) == \
        (ours.state_dict_metadata, ours.planner_data, ours.storage_data)

    template = _shard(mesh)  # resharding reads it back through the DTensor specs
    for t in (template["model"]["big"]._local_tensor, template["optimizer"]["state.big.exp_avg"]):
        t.zero_()
    dcp.load(template, checkpoint_id=str(tmp_path / "staged"))
    _assert_same(template, source)
    stager.close()


def test_the_next_save_reuses_the_buffers_and_copies_the_new_values(mesh: Any) -> None:
    source = _shard(mesh)
    stager = ShardStager(3)
    first = stager.stage(source)
    pointers = {p: t.data_ptr() for p, t in _leaves(first) if isinstance(t, torch.Tensor) and t.numel()}
    stager.release()
    with torch.no_grad():  # training went on: every tensor changed in place, the tail too
        for _, t in _leaves(source):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.add_(1)
    second = stager.stage(source)
    _assert_same(second, source)
    assert {p: t.data_ptr() for p, t in _leaves(second) if isinstance(t, torch.Tensor) and t.numel()} == pointers


def test_a_changed_shape_or_dtype_gets_a_new_buffer_and_a_removed_tensor_frees_its_own() -> None:
    stager = ShardStager(1)
    first = stager.stage({"a": torch.ones(4), "b": torch.ones(4), "c": torch.ones(4), "d": torch.ones(4)})
    stager.release()
    second = stager.stage({"a": torch.ones(4), "b": torch.ones(5), "c": torch.ones(4, dtype=torch.float64)})
    assert second["a"].data_ptr() == first["a"].data_ptr()
    assert second["b"].data_ptr() != first["b"].data_ptr() and second["b"].shape == (5,)
    assert second["c"].data_ptr() != first["c"].data_ptr() and second["c"].dtype == torch.float64
    assert len(stager._buffers) == 3  # d's buffer went with d


def test_tied_tensors_stay_tied_and_a_container_change_does_not_reach_the_staged_tree() -> None:
    w = torch.randn(8)
    source = {"embed": w, "head": w, "groups": [{"lr": 0.1}]}
    staged = ShardStager(1).stage(source)
    assert staged["embed"] is staged["head"] and torch.equal(staged["head"], w)
    source["groups"][0]["lr"] = 0.5
    w.add_(1)
    assert staged["groups"][0]["lr"] == 0.1 and not torch.equal(staged["embed"], w)


def test_buffers_a_save_is_still_writing_are_not_rewritten() -> None:
    """Until release() (DCP returned), stage() refuses: it would overwrite what is being written."""
    stager = ShardStager(2)
    source = {"x": torch.zeros(1000)}
    staged = stager.stage(source)
    source["x"].fill_(7)
    with pytest.raises(RuntimeError, match="still being written by the previous save"):
        stager.stage(source)
    assert torch.equal(staged["x"], torch.zeros(1000))
    stager.release()
    assert torch.equal(stager.stage(source)["x"], torch.full((1000,), 7.0))


@pytest.mark.parametrize("sizes,threads,piece", [([10, 3, 1000, 7], 3, 64), ([ODD], 2, 4 << 20), ([5], 4, 4)])
def test_the_pieces_cover_every_element_once_and_balance_the_threads(sizes: list[int], threads: int,
                                                                     piece: int) -> None:
    sources = [torch.arange(n, dtype=torch.float32) for n in sizes]
    pieces = [(s, torch.full_like(s, -1.0)) for s in sources]
    lists = deal(pieces, threads, piece)
    assert len(lists) == threads
    for part in lists:
        for src, dst in part:
            assert src.numel() * src.element_size() <= max(piece, src.element_size())
            dst.copy_(src)
    assert all(torch.equal(dst, src) for src, dst in pieces)  # every element, the last ones too
    loads = [sum(s.numel() * s.element_size() for s, _ in part) for part in lists]
    assert max(loads) - min(loads) <= piece  # largest first to the least loaded: at most one piece apart


def test_copy_threads_share_the_cpus_among_the_ranks_of_a_machine() -> None:
    assert copy_threads(local_ranks=2, cpus=2) == 1  # this machine: each rank copies on its own core
    assert copy_threads(local_ranks=1, cpus=2) == 2
    assert copy_threads(local_ranks=8, cpus=4) == 1
    assert copy_threads(local_ranks=8, cpus=96) == 8 and copy_threads(local_ranks=1, cpus=96) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sources_are_copied_into_pinned_buffers_kept_across_saves() -> None:
    source = {"w": torch.randn(ODD, device="cuda"), "step": torch.tensor(2.0, device="cuda")}
    stager = ShardStager(2)
    first = stager.stage(source)
    assert first["w"].is_pinned() and first["w"].device.type == "cpu" and torch.equal(first["w"], source["w"].cpu())
    stager.release()
    source["w"].mul_(2)  # queued on the current stream: the copy must come after it
    second = stager.stage(source)
    assert second["w"].data_ptr() == first["w"].data_ptr() and torch.equal(second["w"], source["w"].cpu())
