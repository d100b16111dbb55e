"""The prior's code layout for residual stages (extra tokens, or summed embeddings) and large codebooks (digit
groups)."""

from __future__ import annotations

import json

import pytest
import torch

from ldtok.config import ConfigError
from ldtok.priors import GPT, CodeLayout, CodeLevel


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


def test_summed_stages_take_one_step_per_position_and_sample_each_stage_in_its_range():
    from types import SimpleNamespace

    from ldtok.priors.transformer_trainer import TransformerPriorTask

    layout = CodeLayout.from_manifest(manifest([2, 2], 16, stages=3))
    t = layout.tokens_per_step("summed")
    assert t == 3 and layout.tokens_per_step("tokens") == 1
    torch.manual_seed(0)
    gpt = GPT(vocab_size=layout.vocab_size, block_size=layout.length // t, num_layers=1, num_heads=2, hidden_size=16,
              tokens_per_step=t)
    codes = torch.randint(0, 16, (2, 3, 2, 2), generator=torch.Generator().manual_seed(1))
    tokens = layout.pack({f"indices_stage{s}": codes[:, s] for s in range(3)})  # (B, 12)
    steps = tokens.view(2, 4, 3)  # (B, positions, stages)
    logits = gpt(steps[:, :-1]).logits
    assert logits.shape == (2, 4, layout.vocab_size)  # the start step, then one per fed position
    # a step sees the sum of its stages' embeddings: changing a later position leaves earlier logits alone
    changed = steps.clone()
    changed[:, 2, 1] = 16 + (changed[:, 2, 1] - 16 + 1) % 16
    assert torch.allclose(gpt(changed[:, :-1]).logits[:, :3], logits[:, :3], atol=1e-6)
    assert not torch.allclose(gpt(changed[:, :-1]).logits[:, 3], logits[:, 3])
    # every stage of a position is drawn from its own range; greedy sampling follows the full forward
    sampled = gpt.generate(num_samples=3, length=layout.length, allowed_tokens=layout.allowed_tokens(),
                           generator=torch.Generator().manual_seed(2))
    assert sampled.shape == (3, 12) and ((sampled // 16) == torch.arange(12) % 3).all()
    greedy = gpt.generate(num_samples=1, length=layout.length, allowed_tokens=layout.allowed_tokens(), top_k=1)
    full = gpt(greedy.view(1, 4, 3)[:, :-1]).logits[0]  # (4, V)
    allowed = layout.allowed_tokens().view(4, 3, -1)
    expected = full[:, None].masked_fill(~allowed, float("-inf")).argmax(-1).flatten()
    assert torch.equal(greedy[0], expected)
    # the trainer's loss: each token's cross-entropy over its own range, through the model it holds
    task = SimpleNamespace(tokens_per_step=t, model=gpt, token_ranges=allowed)
    loss = TransformerPriorTask.loss(task, tokens, None)
    logp = torch.log_softmax(logits[:, :, None].masked_fill(~allowed, float("-inf")), dim=-1)  # (B, 4, 3, V)
    by_hand = -logp.gather(-1, steps[..., None]).mean()
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    assert gpt.token_embed.weight.grad is not None
    mixed = CodeLayout(levels=[CodeLevel(name="indices", height=2, width=2, codebook_size=16, offset=0, stages=2,
                                         staged=True),
                               CodeLevel(name="other", height=1, width=1, codebook_size=16, offset=32)])
    with pytest.raises(ConfigError, match="residual_stages: summed needs the same tokens per position"):
        mixed.tokens_per_step("summed")
