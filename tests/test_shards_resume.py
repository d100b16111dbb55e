"""Latent shards: resumability after a crash mid-shard and after a real `kill -9` at the worst moments (CPU,
synthetic; the writer and reader tests are in test_shards.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import pytest
import torch
from test_shards import (  # noqa: F401  (shared synthetic writers)  # the synthetic writers of test_shards.py
    META,
    MODEL,
    C,
    encode_rank,
    ids_of,
    kl_data,
    write_set,
)

from ldtok.shards import ChannelStats, LatentShardDataset, ShardWriter, verify, write_manifest
from ldtok.shards.manifest import part_checksum


# ------------------------------------------------------------------------------------------------ resumability
def test_resume_after_crash_mid_shard(tmp_path):
    data = kl_data(n=10)
    bad = {5}  # undecodable: recorded as skipped, still counts toward shard 1's items
    # run 1 dies with shards 0 and 1 renamed into place, 1 batch buffered, shard 2's temp half-written, and the
    # part manifest never updated for shard 1 (a kill between the rename and the part update)
    encode_rank(tmp_path, kind="kl", data=data, rank=0, world_size=1, bad=bad, stop=10, close=False)
    with pytest.raises(RuntimeError, match=r"ranks not closed \[0\]"):
        write_manifest(tmp_path, model=MODEL)
    part_path = tmp_path / "part-r00.json"
    part = json.loads(part_path.read_text())
    assert [s["file"] for s in part["shards"]] == ["shard-r00-00000.safetensors", "shard-r00-00001.safetensors"]
    part["shards"] = part["shards"][:1]
    part["checksum"] = part_checksum(part)  # what the writer would have written after shard 0
    part_path.write_text(json.dumps(part))
    (tmp_path / ".shard-r00-00002.safetensors.tmp-99999").write_bytes(b"\x00" * 100)
    (tmp_path / ".part-r00.json.tmp-99999").write_text("{")

    state = ShardWriter.completed(tmp_path, 0)
    assert [r.file for r in state.shards] == ["shard-r00-00000.safetensors", "shard-r00-00001.safetensors"]
    assert state.recovered == ["shard-r00-00001.safetensors"] and not state.finished
    assert (state.num_items, state.num_samples) == (8, 7) and state.shards[1].num_skipped == 1
    assert ShardWriter.completed_ids(tmp_path, 0) == ids_of([0, 1, 2, 3, 4, 6, 7])

    writer = encode_rank(tmp_path, kind="kl", data=data, rank=0, world_size=1, bad=bad, close=False)
    assert writer.resume_state.num_items == 8
    assert sorted(writer.removed_temp_files) == [".part-r00.json.tmp-99999", ".shard-r00-00002.safetensors.tmp-99999"]
    writer.close()
    manifest = write_manifest(tmp_path, model=MODEL)
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert manifest["totals"]["num_samples"] == 9 and manifest["totals"]["num_skipped"] == 1
    ds = LatentShardDataset(tmp_path, sample_posterior=False, scaling_factor=1.0, shift_factor=0.0)
    got = {ds[i]["id"]: ds[i]["latents"] for i in range(len(ds))}
    assert sorted(got) == ids_of([0, 1, 2, 3, 4, 6, 7, 8, 9])
    for k in (0, 6, 9):
        assert torch.equal(got[f"img{k:04d}"], data["mean"][k].float())
    # the recovered shard's stats made it into the manifest: equal to a fresh computation over everything written
    keep = [i for i in range(10) if i not in bad]
    direct = ChannelStats(num_channels=C)
    direct.update_gaussian(data["mean"][keep], data["logvar"][keep])
    assert manifest["stats"]["std"] == pytest.approx(direct.result()["std"], rel=1e-12)

    # a finished rank has nothing left; a rerun is a no-op; changing the run's settings is refused
    again = ShardWriter(tmp_path, kind="kl", samples_per_shard=4, metadata=META)
    assert again.finished and again.items_done == 10
    with pytest.raises(RuntimeError, match="finished"):
        again.add({k: v[:1] for k, v in data.items()}, ["x"])
    with pytest.raises(ValueError, match="metadata"):
        ShardWriter(tmp_path, kind="kl", samples_per_shard=4, metadata={**META, "resolution": "64"})
    with pytest.raises(ValueError, match="samples_per_shard"):
        ShardWriter(tmp_path, kind="kl", samples_per_shard=8, metadata=META)
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path, kind="kl", samples_per_shard=4, metadata=META, resume=False)


def _write_and_die(out: str, point: str) -> None:
    """Child process: write 10 VQ samples and SIGKILL itself at `point` (run in a forked process)."""
    from ldtok.shards import writer as writer_module

    real_write_part, real_write_bytes = writer_module.write_part, writer_module.write_bytes_atomic

    def write_part(out_dir, part):
        if point == "after_rename" and len(part["shards"]) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # shard 1 is on disk, the part manifest does not know it
        real_write_part(out_dir, part)

    def write_bytes_atomic(path, data):
        if point == "mid_temp" and path.name.endswith("00002.safetensors"):
            with open(path.parent / f".{path.name}.tmp-{os.getpid()}", "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # half a temp file, the shard never renamed
        real_write_bytes(path, data)

    writer_module.write_part, writer_module.write_bytes_atomic = write_part, write_bytes_atomic
    w = ShardWriter(out, kind="vq", samples_per_shard=4, metadata={"resolution": "32"}, codebook_size=16)
    for b in range(0, 10, 2):
        w.add({"indices": torch.arange(b, b + 2).view(2, 1, 1).expand(2, 2, 2)}, ids_of(range(b, b + 2)))
    w.close()  # shard 2 (items 8, 9) is written here
    os._exit(0)


@pytest.mark.parametrize("point", ["after_rename", "mid_temp"])
def test_resume_after_real_kill_9(tmp_path, point):
    # fork: a real SIGKILL of a real writer process, without paying for a fresh interpreter and torch import
    proc = multiprocessing.get_context("fork").Process(target=_write_and_die, args=(str(tmp_path), point))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL, f"child exited with {proc.exitcode}"
    state = ShardWriter.completed(tmp_path, 0)
    assert len(state.shards) == 2 and state.num_items == 8 and not state.finished
    assert state.recovered == (["shard-r00-00001.safetensors"] if point == "after_rename" else [])
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == ([f".shard-r00-00002.safetensors.tmp-{proc.pid}"] if point == "mid_temp" else [])

    writer = ShardWriter(tmp_path, kind="vq", samples_per_shard=4, metadata={"resolution": "32"}, codebook_size=16)
    for i in ShardWriter.items_for_rank(10, rank=0, world_size=1, start=writer.items_done):
        writer.add({"indices": torch.full((1, 2, 2), i)}, [f"img{i:04d}"])
    writer.close()
    write_manifest(tmp_path, model={})
    report = verify(tmp_path)
    assert report.ok, report.problems
    ds = LatentShardDataset(tmp_path)
    assert sorted(ds[i]["id"] for i in range(len(ds))) == ids_of(range(10))
    assert all(torch.all(ds[i]["indices"] == int(ds[i]["id"][3:])) for i in range(len(ds)))


