"""The prior's code layout for residual stages (extra tokens) and large codebooks (digit groups)."""

from __future__ import annotations

import json

import pytest
import torch

from ldtok.config import ConfigError
from ldtok.priors import GPT, CodeLayout


def manifest(shape: list[int], codebook_size: int, *, stages: int | None = None) -> dict:
    names = ["indices"] if stages is None else [f"indices_stage{s}" for s in range(stages)]
    return {"kind": "vq", "codebook_size": codebook_size,
            "fields": {name: {"dtype": "int32", "shape": shape, "description": ""} for name in names}}


def test_lfq_18_bit_codes_split_into_two_512_way_tokens_and_back():
    layout = CodeLayout.from_manifest(manifest([2, 3], 2**18), groups=2)
    assert layout.vocab_size == 2 * 512 and layout.length == 2 * 3 * 2
    codes = torch.randint(0, 2**18, (4, 2, 3), generator=torch.Generator().manual_seed(0))
    tokens = layout.pack({"indices": codes})
    assert tokens.shape == (4, 12)
    # position-major: position 0's high 9 bits, then its low 9 bits (offset 512), then position 1's ...
    assert torch.equal(tokens[:, 0], codes[:, 0, 0] // 512) and torch.equal(tokens[:, 1], 512 + codes[:, 0, 0] % 512)
    assert torch.equal(layout.unpack(tokens)["indices"], codes)
    allowed = layout.allowed_tokens()
    assert allowed[0, :512].all() and not allowed[0, 512:].any()
    assert allowed[1, 512:].all() and not allowed[1, :512].any()
    assert CodeLayout.from_json(json.loads(json.dumps(layout.to_json()))).to_json() == layout.to_json()


def test_residual_stages_are_extra_tokens_with_their_own_ranges():
    layout = CodeLayout.from_manifest(manifest([2, 2], 16, stages=3))  # indices_stage0 .. 2, (h, w) each
    assert layout.length == 3 * 2 * 2 and layout.vocab_size == 3 * 16
    codes = torch.randint(0, 16, (2, 3, 2, 2), generator=torch.Generator().manual_seed(1))  # (B, S, h, w)
    fields = {f"indices_stage{s}": codes[:, s] for s in range(3)}
    tokens = layout.pack(fields)
    assert torch.equal(tokens[:, :3], codes[:, :, 0, 0] + torch.tensor([0, 16, 32]))  # position 0's three stages
    unpacked = layout.unpack(tokens)
    assert list(unpacked) == list(fields) and all(torch.equal(unpacked[k], v) for k, v in fields.items())
    # generation respects the stage of every position
    gpt = GPT(vocab_size=layout.vocab_size, block_size=layout.length, num_layers=1, num_heads=2, hidden_size=16)
    sampled = gpt.generate(num_samples=3, length=layout.length, allowed_tokens=layout.allowed_tokens(),
                           generator=torch.Generator().manual_seed(2))
    stage = torch.arange(layout.length) % 3
    assert ((sampled // 16) == stage).all()
    out = torch.stack(list(layout.unpack(sampled).values()), dim=1)
    assert out.shape == (3, 3, 2, 2) and int(out.max()) < 16


def test_code_groups_that_do_not_split_the_codebook_are_a_config_error():
    with pytest.raises(ConfigError, match="code_groups"):
        CodeLayout.from_manifest(manifest([2, 2], 240), groups=2)
    plain = CodeLayout.from_manifest(manifest([2, 2], 240))
    codes = torch.randint(0, 240, (1, 2, 2))
    assert torch.equal(plain.pack({"indices": codes}), codes.flatten(1))  # one level, one token: unchanged layout
