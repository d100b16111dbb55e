"""Latent shards: writer, manifest/verify, resumability after crashes, statistics and readers (CPU, synthetic)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch.utils.data import DataLoader

from ldtok.shards import (
    ChannelStats,
    LatentShardDataset,
    LatentShardIterable,
    ShardWriter,
    index_dtype_for,
    load_manifest,
    verify,
    write_manifest,
)

N, C, H, W = 22, 4, 4, 4
META = {"model_config_sha256": "cafe" * 16, "resolution": "32", "transforms": json.dumps({"center_crop": True})}
MODEL = {"path": "/models/tiny", "config_sha256": "cafe" * 16}


def ids_of(indices) -> list[str]:
    return [f"img{i:04d}" for i in indices]


def kl_data(n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, C, 1, 1)
    mean = (torch.randn(n, C, H, W, generator=g) * 3 + offsets).half()
    logvar = (torch.rand(n, C, H, W, generator=g) * 2 - 3).half()
    return {"mean": mean, "logvar": logvar}


def encode_rank(
    out,
    *,
    kind,
    data,
    rank,
    world_size,
    samples_per_shard=4,
    batch_size=2,
    codebook_size=None,
    captions=False,
    bad=(),
    stop=None,
    close=True,
    metadata=META,
) -> ShardWriter:
    """What `ldtok encode` does for one rank: items r, r+W, ... in batches, resuming after complete shards."""
    writer = ShardWriter(
        out,
        kind=kind,
        samples_per_shard=samples_per_shard,
        metadata=metadata,
        rank=rank,
        world_size=world_size,
        codebook_size=codebook_size,
    )
    n = next(iter(data.values())).shape[0]
    items = list(ShardWriter.items_for_rank(n, rank=rank, world_size=world_size, start=writer.items_done))
    items = items[:stop] if stop is not None else items
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        ok = [i for i in chunk if i not in bad]  # "undecodable" items are dropped by collate and reported as skipped
        batch = {k: v[ok] for k, v in data.items()}
        writer.add(
            batch,
            ids_of(ok),
            [f"a photo of {i}" for i in ok] if captions else None,
            skipped=ids_of(i for i in chunk if i in bad),
        )
    if close:
        writer.close()
    return writer


def write_set(out, *, kind="kl", data=None, world_size=2, **kw) -> dict:
    data = kl_data() if data is None else data
    for rank in range(world_size):
        encode_rank(out, kind=kind, data=data, rank=rank, world_size=world_size, **kw)
    return write_manifest(out, model=MODEL, stats=None, extra={"dataset": "synthetic"})


# ------------------------------------------------------------------------------------------------ writer + reader
def test_kl_two_ranks_manifest_and_exact_means(tmp_path):
    data = kl_data()
    manifest = write_set(tmp_path, data=data)
    # rank 0 and 1 each encode 11 items -> shards of 4, 4, 3
    assert manifest["totals"] == {
        "num_samples": N,
        "num_skipped": 0,
        "num_shards": 6,
        "num_bytes": manifest["totals"]["num_bytes"],
    }
    assert [s["file"] for s in manifest["shards"]][:3] == [f"shard-r00-0000{k}.safetensors" for k in range(3)]
    for s in manifest["shards"]:
        assert hashlib.sha256((tmp_path / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert manifest["fields"]["mean"] == {
        "dtype": "float16",
        "shape": [C, H, W],
        "description": "posterior mean (C, h, w)",
    }
    with safe_open(str(tmp_path / "shard-r01-00000.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("mean").dtype == torch.float16
    assert json.loads(meta["ids"]) == ids_of([1, 3, 5, 7])
    assert meta["kind"] == "kl" and meta["ldtok_format"] == "1" and meta["dtype"] == "float16"
    assert meta["model_config_sha256"] == META["model_config_sha256"] and meta["resolution"] == "32"
    assert load_manifest(tmp_path) == manifest
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert (report.num_samples, report.num_shards) == (N, 6)

    ds = LatentShardDataset(tmp_path, sample_posterior=False, scaling_factor=1.0, shift_factor=0.0)
    assert len(ds) == N
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        k = int(item["id"][3:])
        assert item["latents"].dtype == torch.float32 and item["latents"].shape == (C, H, W)
        assert torch.equal(item["latents"], data["mean"][k].float())
        seen.append(k)
    assert sorted(seen) == list(range(N))

    # defaults come from the manifest stats: the posterior moments of all latents, SD convention (no shift)
    stats = manifest["stats"]
    assert stats["convention"] == "sd" and stats["shift_factor"] is None
    ds = LatentShardDataset(tmp_path, sample_posterior=False)
    scaled = ds[0]["latents"]
    k = int(ds[0]["id"][3:])
    expected = data["mean"][k].float() * stats["scaling_factor"]
    torch.testing.assert_close(scaled, expected)

    # the streaming reader yields the same items (no shuffle, one process: rank 0's shards, then rank 1's)
    streamed = list(LatentShardIterable(tmp_path, shuffle=False, sample_posterior=False))
    assert [item["id"] for item in streamed] == [ds[i]["id"] for i in range(len(ds))]
    for item in streamed:
        expected = data["mean"][int(item["id"][3:])].float() * stats["scaling_factor"]
        torch.testing.assert_close(item["latents"], expected)


def test_manifest_stats_are_posterior_moments_of_whole_set(tmp_path):
    data = kl_data()
    stats = write_set(tmp_path, data=data)["stats"]
    m, v = data["mean"].double(), data["logvar"].double().exp()
    mu = m.mean()
    var = ((m - mu) ** 2).mean() + v.mean()  # mixture variance: spread of means + posterior variance
    n_total = m.numel()
    assert stats["count"] == N * H * W
    assert stats["mean"] == pytest.approx(mu.item(), rel=1e-9)
    assert stats["std"] ** 2 * (n_total - 1) / n_total == pytest.approx(var.item(), rel=1e-9)
    # SD convention: unit second moment, no shift
    assert stats["scaling_factor"] == pytest.approx(1 / stats["rms"]) and stats["shift_factor"] is None
    assert stats["rms"] ** 2 == pytest.approx(var.item() + mu.item() ** 2, rel=1e-9)
    channel_mean = m.mean(dim=(0, 2, 3))
    assert stats["channel_mean"] == pytest.approx(channel_mean.tolist(), rel=1e-9)


def test_posterior_samples_have_the_stored_statistics(tmp_path):
    mean = torch.full((1, C, 8, 8), 1.5).float()
    mean[0, 1] = -2.0
    logvar = torch.full((1, C, 8, 8), 2 * torch.log(torch.tensor(0.5)).item())
    writer = ShardWriter(tmp_path, kind="kl", samples_per_shard=4, metadata=META)
    writer.add({"mean": mean, "logvar": logvar}, ["only"])
    writer.close()
    write_manifest(tmp_path, model=MODEL)
    ds = LatentShardDataset(tmp_path, sample_posterior=True, scaling_factor=1.0, shift_factor=0.0)
    draws = torch.stack([ds[0]["latents"] for _ in range(200)])  # (200, C, 8, 8)
    assert not torch.equal(draws[0], draws[1]), "a fresh eps must be drawn at every access"
    eps = (draws - mean) / 0.5
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02


def test_vq_and_vqvae2_indices_labels_captions_flips(tmp_path):
    g = torch.Generator().manual_seed(1)
    K = 1000
    data = {"indices": torch.randint(0, K, (N, H, W), generator=g), "label": torch.arange(N) % 7}
    manifest = write_set(tmp_path / "vq", kind="vq", data=data, codebook_size=K, captions=True)
    assert manifest["fields"]["indices"]["dtype"] == "int16" and manifest["stats"] is None
    ds = LatentShardDataset(tmp_path / "vq")
    for i in range(len(ds)):
        item = ds[i]
        k = int(item["id"][3:])
        assert item["indices"].dtype == torch.int64 and torch.equal(item["indices"], data["indices"][k])
        assert item["label"].item() == k % 7 and item["caption"] == f"a photo of {k}"

    K2 = 256
    top, bottom = torch.randint(0, K2, (N, 2, 2), generator=g), torch.randint(0, K2, (N, 4, 4), generator=g)
    data2 = {
        "indices_top": top,
        "indices_bottom": bottom,
        "indices_top_flip": top.flip(-1),
        "indices_bottom_flip": bottom.flip(-1),
    }
    manifest = write_set(tmp_path / "v2", kind="vqvae2", data=data2, codebook_size=K2)
    assert {f["dtype"] for f in manifest["fields"].values()} == {"uint8"}
    assert manifest["fields"]["indices_top_flip"]["description"].endswith("flipped image")
    assert verify(tmp_path / "v2").ok
    torch.manual_seed(0)
    ds = LatentShardDataset(tmp_path / "v2", use_flip=True)
    flipped = 0
    for i in range(len(ds)):
        item = ds[i]
        k = int(item["id"][3:])
        is_flip = torch.equal(item["indices_top"], top[k].flip(-1)) and not torch.equal(top[k], top[k].flip(-1))
        flipped += is_flip
        ref_top, ref_bottom = (top[k].flip(-1), bottom[k].flip(-1)) if is_flip else (top[k], bottom[k])
        assert torch.equal(item["indices_top"], ref_top) and torch.equal(item["indices_bottom"], ref_bottom)
    assert 0 < flipped < N
    with pytest.raises(ValueError, match="use_flip"):
        LatentShardDataset(tmp_path / "vq", use_flip=True)


def test_index_dtype_by_codebook_size_and_range_check(tmp_path):
    assert [index_dtype_for(k) for k in (2, 256, 257, 32768, 32769, 2**20)] == [
        torch.uint8,
        torch.uint8,
        torch.int16,
        torch.int16,
        torch.int32,
        torch.int32,
    ]
    writer = ShardWriter(tmp_path, kind="vq", samples_per_shard=4, metadata=META, codebook_size=256)
    with pytest.raises(ValueError, match="outside codebook_size"):
        writer.add({"indices": torch.full((1, 2, 2), 256)}, ["a"])
    with pytest.raises(ValueError, match="unknown"):
        writer.add({"indices": torch.zeros(1, 2, 2, dtype=torch.long), "mean": torch.zeros(1)}, ["a"])
    with pytest.raises(ValueError, match="written by ShardWriter"):
        ShardWriter(tmp_path, kind="vq", samples_per_shard=4, metadata={"ids": "[]"}, codebook_size=256)


# ------------------------------------------------------------------------------------------------ verify
def test_verify_detects_corruption_missing_duplicates_and_strays(tmp_path):
    data = {"indices": torch.randint(0, 16, (N, H, W))}
    good = tmp_path / "good"
    write_set(good, kind="vq", data=data, codebook_size=16)
    assert verify(good).ok

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    path = corrupt / "shard-r00-00001.safetensors"
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_len + 5] ^= 0xFF  # a byte of tensor data, header untouched
    path.write_bytes(bytes(raw))
    report = verify(corrupt)
    assert not report.ok and any("shard-r00-00001" in p and "sha256" in p for p in report.problems)

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "shard-r01-00002.safetensors").unlink()
    report = verify(missing)
    assert not report.ok and any("shard-r01-00002" in p and "missing" in p for p in report.problems)

    strays = tmp_path / "strays"
    shutil.copytree(good, strays)
    (strays / ".shard-r00-00009.safetensors.tmp-4242").write_bytes(b"partial")
    shutil.copy(strays / "shard-r00-00000.safetensors", strays / "shard-r00-00007.safetensors")
    problems = verify(strays).problems
    assert any("temp file" in p for p in problems) and any("not listed" in p for p in problems)

    # a shard rewritten with a row missing from its tensor (and the index "fixed" to its new hash): counts disagree
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    path = tampered / "shard-r00-00000.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, indices = f.metadata(), f.get_tensor("indices")
    path.write_bytes(safetensors_save({"indices": indices[:3]}, metadata=meta))
    index = json.loads((tampered / "index.json").read_text())
    index["shards"][0].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), num_bytes=path.stat().st_size)
    (tampered / "index.json").write_text(json.dumps(index))
    problems = verify(tampered).problems
    assert problems == ["shard-r00-00000.safetensors: indices has shape [3, 4, 4], expected 4 rows"], problems

    dup = tmp_path / "dup"
    encode_rank(dup, kind="vq", data=data, rank=0, world_size=2, codebook_size=16)
    writer = ShardWriter(dup, kind="vq", samples_per_shard=4, metadata=META, rank=1, world_size=2, codebook_size=16)
    writer.add({"indices": data["indices"][[1, 2]]}, ["img0001", "img0002"])  # img0002 is rank 0's
    writer.close()
    write_manifest(dup, model=MODEL)
    report = verify(dup)
    assert not report.ok and any("duplicate sample id 'img0002'" in p for p in report.problems)


# ------------------------------------------------------------------------------------------------ statistics
def test_channel_stats_match_direct_computation_and_merge():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 3, 5, 5, generator=g) * torch.tensor([1.0, 4.0, 0.1]).view(1, 3, 1, 1) + torch.tensor(
        [100.0, -2.0, 0.3]
    ).view(1, 3, 1, 1)
    whole = ChannelStats(num_channels=3)
    for chunk in x.split(3):
        whole.update(chunk)
    r = whole.result()
    x64 = x.double()
    per_channel = x64.transpose(0, 1).reshape(3, -1)
    assert r["channel_mean"] == pytest.approx(per_channel.mean(1).tolist(), rel=1e-12)
    assert r["channel_std"] == pytest.approx(per_channel.std(1).tolist(), rel=1e-10)
    assert r["mean"] == pytest.approx(x64.mean().item(), rel=1e-12)
    assert r["std"] == pytest.approx(x64.std().item(), rel=1e-10)
    rms = x64.square().mean().sqrt().item()
    assert r["scaling_factor"] == pytest.approx(1 / rms, rel=1e-10) and r["shift_factor"] is None  # SD: no shift
    assert r["scaling_factor_unshifted"] == pytest.approx(1 / rms, rel=1e-10)
    sd3 = whole.result(convention="sd3")
    assert sd3["scaling_factor"] == pytest.approx(1 / x64.std().item(), rel=1e-10)
    assert sd3["shift_factor"] == pytest.approx(x64.mean().item(), rel=1e-12)

    a, b = ChannelStats(num_channels=3), ChannelStats(num_channels=3)
    a.update(x[:4])
    b.update(x[4:])
    merged = ChannelStats.from_state_dict(json.loads(json.dumps(a.state_dict()))).merge(b)
    assert merged.count == whole.count
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-12, atol=0)


def _all_reduce_worker(rank: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x = torch.arange(2 * 2 * 9, dtype=torch.float32).view(2, 2, 3, 3) ** 1.5
    stats = ChannelStats(num_channels=2)
    stats.update(x[rank : rank + 1])
    stats.all_reduce()
    torch.save(stats.state_dict(), Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_channel_stats_all_reduce_two_processes(tmp_path):
    # fork: the children need nothing but tiny CPU tensors and gloo, and skip re-importing torch (seconds each)
    torch.multiprocessing.start_processes(
        _all_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert states[0] == states[1], "ranks must agree bit for bit"
    whole = ChannelStats(num_channels=2)
    whole.update(torch.arange(2 * 2 * 9, dtype=torch.float32).view(2, 2, 3, 3) ** 1.5)
    assert states[0]["count"] == whole.count
    assert states[0]["mean"] == pytest.approx(whole.mean.tolist(), rel=1e-13)
    assert states[0]["m2"] == pytest.approx(whole.m2.tolist(), rel=1e-12)


# ------------------------------------------------------------------------------------------------ iterable reader
def test_iterable_covers_every_sample_once_across_ranks_and_workers(tmp_path):
    data = {"indices": torch.arange(N).view(N, 1, 1).expand(N, 2, 2).contiguous()}
    write_set(tmp_path, kind="vq", data=data, codebook_size=N, samples_per_shard=2)  # 12 shards

    def epoch_ids(epoch: int, num_workers: int = 2) -> list[list[str]]:
        per_rank = []
        for rank in range(2):
            ds = LatentShardIterable(tmp_path, shuffle=True, seed=3, rank=rank, world_size=2)
            ds.set_epoch(epoch)
            ids = []
            for item in DataLoader(ds, batch_size=None, num_workers=num_workers):
                assert torch.all(item["indices"] == int(item["id"][3:]))  # values travel with their id
                ids.append(item["id"])
            per_rank.append(ids)
        return per_rank

    e1 = epoch_ids(1)
    everything = e1[0] + e1[1]
    assert sorted(everything) == ids_of(range(N)), "every sample exactly once per epoch"
    assert set(e1[0]).isdisjoint(e1[1]) and e1[0] and e1[1]
    assert epoch_ids(1) == e1, "same seed and epoch, same order"
    assert epoch_ids(2) != e1, "a new epoch reshuffles"

    # map-style reader through worker processes (handles are opened per worker, not pickled)
    ds = LatentShardDataset(tmp_path)
    ds[0]  # opens a handle in this process before the workers start
    ids = [item["id"] for item in DataLoader(ds, batch_size=None, num_workers=2)]
    assert sorted(ids) == ids_of(range(N))
