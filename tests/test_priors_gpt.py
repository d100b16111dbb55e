"""The GPT prior and its code layout (unit tests), the prior configs, and decoding a diffusers VQModel's codes."""

import json

import pytest
import torch
from prior_helpers import RES, ROOT, tiny_vqmodel

from ldtok.config import ConfigError, load_config
from ldtok.priors import GPT, CodeLayout, CodeLevel, KVCache, PriorDiffusionConfig, PriorTransformerConfig


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(**{"vocab_size": 24, "block_size": 12, "num_layers": 2, "num_heads": 2, "hidden_size": 32,
                  **overrides}).eval()


def test_gpt_shapes_unconditional_and_class_conditional():
    codes = torch.randint(0, 24, (3, 11))
    assert tiny_gpt()(codes).logits.shape == (3, 12, 24)  # the start token, then one position per code
    assert tiny_gpt()(codes[:, :0]).logits.shape == (3, 1, 24)
    model = tiny_gpt(num_classes=5)
    a = model(codes, class_labels=torch.tensor([0, 1, 2])).logits
    b = model(codes, class_labels=torch.tensor([4, 1, 2])).logits
    assert a.shape == (3, 12, 24)
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1:], b[1:])  # the label conditions its own row only
    with pytest.raises(AssertionError, match="needs labels"):
        model(codes)
    with pytest.raises(AssertionError, match="block_size"):
        tiny_gpt()(torch.randint(0, 24, (1, 12)))  # start token + 12 codes > block_size 12


def test_gpt_is_causal():
    model = tiny_gpt()
    codes = torch.randint(0, 24, (2, 11))
    for t in (0, 4, 10):
        changed = codes.clone()
        changed[:, t] = (changed[:, t] + 7) % 24
        a, b = model(codes).logits, model(changed).logits
        # logits at position i read codes < i: positions <= t cannot see code t, position t + 1 does
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_kv_cache_matches_the_full_forward_and_greedy_generation():
    model = tiny_gpt(num_classes=3)
    labels = torch.tensor([0, 2])
    codes = torch.randint(0, 24, (2, 11))
    full = model(codes, class_labels=labels).logits
    cache = KVCache(num_layers=2)
    pieces = [model(codes[:, :0], class_labels=labels, cache=cache).logits,
              model(codes[:, :5], cache=cache).logits,  # several tokens after a non-empty cache: explicit mask
              model(codes[:, 5:6], cache=cache).logits,
              model(codes[:, 6:], cache=cache).logits]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    greedy = model.generate(num_samples=2, length=12, class_labels=labels, top_k=1)
    again = model(greedy[:, :-1], class_labels=labels).logits.argmax(-1)  # (2, 12), no cache
    assert torch.equal(greedy, again)


def test_code_layout_packs_levels_with_offsets_and_generate_respects_them():
    layout = CodeLayout(levels=[CodeLevel(name="indices_top", height=2, width=2, codebook_size=5, offset=0),
                                CodeLevel(name="indices_bottom", height=2, width=4, codebook_size=7, offset=5)])
    assert (layout.length, layout.vocab_size) == (12, 12)
    top, bottom = torch.randint(0, 5, (3, 2, 2)), torch.randint(0, 7, (3, 2, 4))
    tokens = layout.pack({"indices_top": top.to(torch.uint8), "indices_bottom": bottom, "id": ["a", "b", "c"]})
    assert tokens.shape == (3, 12) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, :4], top.flatten(1)) and torch.equal(tokens[:, 4:], bottom.flatten(1) + 5)
    back = layout.unpack(tokens)
    assert torch.equal(back["indices_top"], top) and torch.equal(back["indices_bottom"], bottom)
    assert CodeLayout.from_json(json.loads(json.dumps(layout.to_json()))).to_json() == layout.to_json()
    allowed = layout.allowed_tokens()
    assert allowed[:4].sum(-1).eq(5).all() and allowed[4:, 5:].all() and not allowed[4:, :5].any()
    sampled = tiny_gpt(vocab_size=12).generate(num_samples=64, length=12, allowed_tokens=allowed,
                                               generator=torch.Generator().manual_seed(0))
    assert (sampled[:, :4] < 5).all() and (sampled[:, 4:] >= 5).all()
    with pytest.raises(AssertionError, match="overlapping"):
        CodeLayout(levels=[CodeLevel(name="a", height=1, width=1, codebook_size=5, offset=0),
                           CodeLevel(name="b", height=1, width=1, codebook_size=5, offset=4)])


def test_configs_load_demo_files_and_reject_unknown_keys():
    diffusion = load_config(PriorDiffusionConfig, ROOT / "configs/prior-diffusion-demo.yaml", ["train.max_steps=3"])
    assert diffusion.train.max_steps == 3 and diffusion.unet.attention == [False, True, True]
    transformer = load_config(PriorTransformerConfig, ROOT / "configs/prior-transformer-demo.yaml", ["top_k=5"])
    assert transformer.top_k == 5 and transformer.model.num_layers == 4
    with pytest.raises(ConfigError, match="unet.bogus"):
        load_config(PriorDiffusionConfig, ROOT / "configs/prior-diffusion-demo.yaml", ["unet.bogus=1"])
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_config(PriorTransformerConfig, ROOT / "configs/prior-transformer-demo.yaml", ["model.hidden_size=big"])
    with pytest.raises(ConfigError, match="unet.attention: needs one entry per level"):
        load_config(PriorDiffusionConfig, None, ["shards=x", "unet.attention=[true]"])
    with pytest.raises(ConfigError, match="train.ema_decay: must be < 1"):
        load_config(PriorDiffusionConfig, None, ["shards=x", "train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="temperature: must be > 0"):
        load_config(PriorTransformerConfig, None, ["shards=x", "temperature=0"])


@pytest.mark.parametrize("lookup_from_codebook", [False, True])
def test_decode_fields_of_a_diffusers_vqmodel_equals_decoding_its_quantized_latents(tmp_path, lookup_from_codebook):
    from ldtok.models import load_tokenizer

    torch.manual_seed(0)
    vq = tiny_vqmodel(lookup_from_codebook=lookup_from_codebook).eval()
    vq.save_pretrained(tmp_path / "vq")
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    tokenizer = load_tokenizer(tmp_path / "vq")
    assert tokenizer.codebook_sizes == [32]
    with torch.no_grad():
        h = vq.encode(x).latents  # (2, 4, 8, 8)
        _, _, (_, _, indices) = vq.quantize(h)
        expected = vq.decode(h).sample  # quantizes h itself, whatever lookup_from_codebook says
        images = tokenizer.decode_fields({"indices": indices.reshape(2, 8, 8)})
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
