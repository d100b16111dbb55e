"""Residual VQ's shards: one index tensor per stage (`indices_stage0`, ...) in the smallest integer dtype, read back
by the readers and the prior's layout, decoded by `decode_fields` and `ldtok decode`; shards of the earlier layout
(one `(S, h, w)` tensor) are refused with a one-line error that says to re-encode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_encode import (  # noqa: F401  (data_dir and one_thread are fixtures)
    TINY,
    check_decode_matches_reconstructions,
    data_dir,
    dataset_items,
    encode_args,
    one_thread,
    read_shards,
)

from ldtok.cli import main as ldtok
from ldtok.errors import LdtokError
from ldtok.latent_kinds import LATENT_KINDS, stored_latent
from ldtok.models import ModelConfig, build_model, load_tokenizer
from ldtok.priors import GPT, CodeLayout
from ldtok.quantizers import QuantizerConfig
from ldtok.shards import LatentShardDataset, ShardWriter, write_manifest
from ldtok.shards.verify import index_problems

STAGES, K = 3, 16
FIELDS = ("indices_stage0", "indices_stage1", "indices_stage2")


def residual_model():
    """A tiny residual-VQ VQGAN whose codebooks were set by one training-mode forward (k-means init), in eval mode."""
    torch.manual_seed(0)
    quantizer = QuantizerConfig(type="residual", num_stages=STAGES, codebook_size=K, codebook_dim=4, kmeans_init=True,
                                kmeans_iters=3, dead_code_steps=0)
    model = build_model(ModelConfig(type="vqgan", **TINY, quantizer=quantizer)).train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    return model.eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "residual"
    residual_model().export(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, model_dir, data_dir) -> Path:  # noqa: F811 - the fixture
    out = tmp_path_factory.mktemp("residual") / "shards"
    assert ldtok(encode_args(model_dir, out, data_dir, "--flip")) == 0
    return out


def test_the_interface_gives_one_field_per_stage():
    model = residual_model()
    assert (model.latent_kind, model.index_stages, model.level_names, model.codebook_sizes) == ("vq", STAGES,
                                                                                               ["code"], [K])
    assert model.latent.fields == FIELDS and model.latent.levels == ("indices",)
    assert model.shard_fields() == dict.fromkeys(FIELDS, torch.uint8)
    assert model.field_codebook_sizes == dict.fromkeys(FIELDS, K)
    x = images()
    indices = model.encode_to_indices(x)  # (B, S, h, w)
    fields = model.encode_fields(x)
    assert list(fields) == list(FIELDS)
    for s, name in enumerate(FIELDS):
        assert fields[name].shape == (2, 16, 16) and torch.equal(fields[name], indices[:, s])
    with torch.no_grad():
        torch.testing.assert_close(model.decode_fields(fields), model(x).sample, rtol=0, atol=1e-6)
    # the single-map kinds keep their table entries
    vq = build_model(ModelConfig(type="vqgan", **TINY, quantizer=QuantizerConfig(codebook_size=300, codebook_dim=4)))
    assert vq.index_stages is None and vq.latent is LATENT_KINDS["vq"]


def test_encode_stores_each_stage_in_the_smallest_dtype_and_everything_reads_it(shards, model_dir, data_dir,  # noqa: F811
                                                                                 tmp_path):
    assert ldtok(["verify", str(shards)]) == 0
    manifest, rows, _ = read_shards(shards)
    assert manifest["kind"] == "vq" and manifest["codebook_size"] == K
    assert set(manifest["fields"]) == {*FIELDS, *(f + "_flip" for f in FIELDS), "label"}
    for name in FIELDS:
        assert manifest["fields"][name]["dtype"] == "uint8" and manifest["fields"][name]["shape"] == [16, 16]
        assert f"residual stage {name[-1]}" in manifest["fields"][name]["description"]
    model = load_tokenizer(str(model_dir))
    counts = {name: torch.zeros(K, dtype=torch.int64) for name in FIELDS}
    for item in dataset_items(data_dir):
        x, row = item["pixel_values"][None], rows[item["id"]]
        for suffix, view in (("", x), ("_flip", x.flip(-1))):
            indices = model.encode_to_indices(view)  # (1, S, h, w)
            for s, name in enumerate(FIELDS):
                assert torch.equal(row[name + suffix].long(), indices[0, s]), f"{item['id']} {name + suffix}"
        for name in FIELDS:
            counts[name] += torch.bincount(row[name].long().flatten(), minlength=K)
    for name in FIELDS:  # code usage per stage
        usage = manifest["stats"]["code_usage"][name]
        assert usage["codes_used"] == int((counts[name] > 0).sum()) and usage["count"] == int(counts[name].sum())

    dataset = LatentShardDataset(shards)
    item = dataset[0]
    assert set(item) - {"id", "label", "caption"} == set(FIELDS) and all(item[f].dtype == torch.int64 for f in FIELDS)
    assert all(torch.equal(item[f], rows[item["id"]][f].long()) for f in FIELDS)
    check_decode_matches_reconstructions(shards, model_dir, data_dir, tmp_path / "decoded")


def test_the_prior_trains_on_stage_tokens_and_its_samples_decode(shards, model_dir):
    manifest = json.loads((shards / "index.json").read_text())
    model = load_tokenizer(str(model_dir))
    layout = CodeLayout.from_manifest(manifest, codebook_sizes=model.codebook_sizes)
    (level,) = layout.levels
    assert (level.name, level.fields, level.stages) == ("indices", FIELDS, STAGES)
    assert layout.length == 16 * 16 * STAGES and layout.vocab_size == STAGES * K
    loader = torch.utils.data.DataLoader(LatentShardDataset(shards), batch_size=4, shuffle=False)
    batch = next(iter(loader))
    tokens = layout.pack(batch)
    assert torch.equal(tokens[:, :STAGES], torch.stack([batch[f][:, 0, 0] for f in FIELDS], 1) + torch.arange(3) * K)
    assert all(torch.equal(layout.unpack(tokens)[f], batch[f]) for f in FIELDS)
    torch.manual_seed(0)
    gpt = GPT(vocab_size=layout.vocab_size, block_size=layout.length, num_layers=1, num_heads=2, hidden_size=16)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        logits = gpt(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    sampled = gpt.generate(num_samples=2, length=layout.length, allowed_tokens=layout.allowed_tokens(),
                           generator=torch.Generator().manual_seed(0))
    codes = layout.unpack(sampled)
    assert set(codes) == set(FIELDS) and all(c.shape == (2, 16, 16) and int(c.max()) < K for c in codes.values())
    decoded = model.decode_fields(codes)
    with torch.no_grad():
        expected = model.decode_indices(torch.stack([codes[f] for f in FIELDS], dim=1))
    assert decoded.shape == (2, 3, 32, 32) and torch.equal(decoded, expected)


def old_layout(root: Path) -> Path:
    """A directory as the earlier residual layout wrote it: kind `vq`, one `indices` field of shape `(S, h, w)`."""
    with ShardWriter(root, kind="vq", samples_per_shard=4, metadata={"resolution": "32"}, codebook_size=K) as w:
        w.add({"indices": torch.randint(0, K, (2, 4, 4))}, ["a", "b"])
    write_manifest(root, model={})
    manifest = json.loads((root / "index.json").read_text())
    manifest["fields"]["indices"]["shape"] = [STAGES, 4, 4]
    (root / "index.json").write_text(json.dumps(manifest))
    return root


def test_shards_of_the_earlier_residual_layout_are_refused_in_one_line(tmp_path):
    root = old_layout(tmp_path / "old")
    manifest = json.loads((root / "index.json").read_text())
    with pytest.raises(LdtokError, match="re-encode") as e:
        stored_latent(manifest["kind"], manifest["fields"])
    assert "\n" not in str(e.value)
    (problem,) = index_problems(manifest)
    assert "re-encode" in problem and "\n" not in problem
    with pytest.raises(LdtokError, match="re-encode"):
        LatentShardDataset(root)
    with pytest.raises(LdtokError, match="re-encode"):
        CodeLayout.from_manifest(manifest)
    with pytest.raises(LdtokError, match=r"re-encode") as e:  # `ldtok decode` stops before loading any model
        ldtok(["decode", str(root), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "decoded")])
    assert "\n" not in str(e.value) and not (tmp_path / "decoded").exists()
    # single-map kinds, Gaussian kinds and empty directories read as before
    assert stored_latent("vq", {"indices": {"shape": [4, 4]}}) is LATENT_KINDS["vq"]
    assert stored_latent("kl", None) is LATENT_KINDS["kl"] and stored_latent("vq", None) is LATENT_KINDS["vq"]
    with pytest.raises(LdtokError, match="incomplete residual-stage fields"):
        stored_latent("vq", {"indices_stage0": {"shape": [4, 4]}, "indices_stage2": {"shape": [4, 4]}})


def test_a_writer_refuses_to_resume_shards_of_other_fields(tmp_path):
    with ShardWriter(tmp_path, kind="vq", samples_per_shard=2, metadata={}, codebook_size=K) as w:
        w.add({"indices": torch.randint(0, K, (2, 4, 4))}, ["a", "b"])
    with pytest.raises(ValueError, match=r"existing shards store fields \['indices'\]"):
        ShardWriter(tmp_path, kind="vq", samples_per_shard=2, metadata={}, codebook_size=K, num_stages=2)
    staged = ShardWriter(tmp_path / "staged", kind="vq", samples_per_shard=2, metadata={}, codebook_size=K,
                         num_stages=2)
    with pytest.raises(ValueError, match=r"\(B, h, w\) integer tensor"):  # no stage axis any more
        staged.add({"indices_stage0": torch.zeros(2, 2, 4, 4, dtype=torch.long),
                    "indices_stage1": torch.zeros(2, 4, 4, dtype=torch.long)}, ["a", "b"])


def test_a_residual_prior_layout_written_before_stage_fields_loads_with_them():
    old = {"levels": [{"name": "indices", "height": 2, "width": 2, "codebook_size": K, "offset": 0, "stages": 2,
                       "groups": 1}]}
    layout = CodeLayout.from_json(old)
    assert layout.levels[0].fields == ("indices_stage0", "indices_stage1") and layout.length == 8
    tokens = torch.tensor([[0, 16, 1, 17, 2, 18, 3, 19]])
    codes = layout.unpack(tokens)
    assert codes["indices_stage0"].flatten().tolist() == [0, 1, 2, 3]
    assert torch.equal(codes["indices_stage1"], codes["indices_stage0"])  # token 16 + i is stage 1's code i
    assert CodeLayout.from_json(json.loads(json.dumps(layout.to_json()))).to_json() == layout.to_json()
