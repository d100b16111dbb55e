"""VectorQuantizer invariants: exact inverse, EMA locality, beta placement, precision, dead codes, 2-rank agreement."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from ldtok.quantizers import VQ_FIELDS, QuantizerConfig, VectorQuantizer

K, D = 32, 4


def _quantizer(**overrides) -> VectorQuantizer:
    kwargs = {"codebook_size": K, "codebook_dim": D, "kmeans_init": False, "dead_code_steps": 0}
    kwargs.update(overrides)
    return VectorQuantizer(**kwargs)


def _z_near_codes(q: VectorQuantizer, ids: list[int], noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(1, D, 1, len(ids)) latents equal to (or near) the given codes."""
    g = torch.Generator().manual_seed(seed)
    codes = q.export_codebook()[ids]  # (n, D)
    codes = codes + noise * torch.randn(codes.shape, generator=g)
    return codes.t().reshape(1, D, 1, len(ids)).contiguous()


def test_config_matches_constructor():
    cfg = QuantizerConfig(codebook_size=K, codebook_dim=D, beta=0.5, dead_code_steps=7)
    q = VectorQuantizer.from_config(cfg)
    for name in VQ_FIELDS:
        if name != "codebook_transform":  # the attribute of that name is SimVQ's linear map
            assert getattr(q, name) == getattr(cfg, name), name
    assert not q.linear_codebook
    assert QuantizerConfig().dead_code_steps > 0
    with pytest.raises(TypeError):
        VectorQuantizer(K, D)  # keyword-only
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(codebook_size=K, codebook_dim=D, decay=1.0)


@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.parametrize("l2_normalize", [False, True])
def test_index_code_round_trip(ema, l2_normalize):
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=K, codebook_dim=D, ema=ema, l2_normalize=l2_normalize, kmeans_iters=3)
    z = torch.randn(2, D, 8, 8)
    q.train()
    q(z)  # k-means init + one update, so the table is not the constructor's
    assert int(q.initialized) == 1
    q.eval()
    out = q(3.0 * z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == torch.float32
    assert out.indices.shape == (2, 8, 8) and out.indices.dtype == torch.int64
    codes = q.codes_from_indices(out.indices)
    assert codes.dtype == torch.float32
    assert torch.equal(out.quantized, codes)  # bitwise

    table = q.export_codebook()
    assert table.shape == (K, D)
    if l2_normalize:
        torch.testing.assert_close(table.norm(dim=1), torch.ones(K))
    # the chosen codes really are the nearest ones
    flat = (3.0 * z).permute(0, 2, 3, 1).reshape(-1, D)
    if l2_normalize:
        flat = torch.nn.functional.normalize(flat, dim=1)
    d = torch.cdist(flat.double(), table.double())
    chosen = d.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, d.min(dim=1).values)


def test_ema_step_moves_only_used_codes():
    q = _quantizer(ema=True, decay=0.9)
    used = [1, 5, 9, 20]
    z = _z_near_codes(q, used * 3, noise=0.01)
    old = {name: buf.clone() for name, buf in q.named_buffers()}
    q.train()
    out = q(z)
    assert sorted(out.indices.unique().tolist()) == used

    unused = [k for k in range(K) if k not in used]
    assert torch.equal(q.embedding[unused], old["embedding"][unused])  # bit-identical
    assert not torch.equal(q.embedding[used], old["embedding"][used])

    # the used codes follow the Laplace-smoothed EMA
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    idx = out.indices.reshape(-1)
    counts = torch.bincount(idx, minlength=K).float()
    sums = torch.zeros(K, D).index_add_(0, idx, flat)
    cluster_size = 0.9 * old["cluster_size"] + 0.1 * counts
    embed_sum = 0.9 * old["embed_sum"] + 0.1 * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + q.eps) / (n + K * q.eps) * n
    torch.testing.assert_close(q.cluster_size, cluster_size)
    torch.testing.assert_close(q.embed_sum, embed_sum)
    torch.testing.assert_close(q.embedding[used], (embed_sum / smoothed[:, None])[used])
    assert q.steps_unused[used].eq(0).all() and q.steps_unused[unused].eq(1).all()
    assert out.usage.item() == pytest.approx(len(used) / K)
    assert out.perplexity.item() == pytest.approx(len(used))  # uniform over 4 codes
    assert out.codebook_loss.item() == 0.0
    torch.testing.assert_close(out.loss, q.beta * out.commit_loss)

    q.eval()
    before = q.embedding.clone()
    q(z)
    assert torch.equal(q.embedding, before)  # no update in eval


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_beta_weights_only_the_commitment_term(l2_normalize):
    torch.manual_seed(0)
    z0 = torch.randn(2, D, 4, 4)
    grads = {}
    for beta in (0.25, 1.0):
        q = _quantizer(ema=False, beta=beta, l2_normalize=l2_normalize).train()
        z = z0.clone().requires_grad_(True)
        out = q(z)
        out.loss.backward()
        grads[beta] = (z.grad.clone(), q.embedding.grad.clone())
    z_grad_a, cb_grad_a = grads[0.25]
    z_grad_b, cb_grad_b = grads[1.0]
    assert z_grad_a.abs().sum() > 0 and cb_grad_a.abs().sum() > 0
    torch.testing.assert_close(z_grad_b, 4.0 * z_grad_a)  # encoder gradient scales with beta
    assert torch.equal(cb_grad_a, cb_grad_b)  # codebook gradient does not

    # each term reaches only its side
    q = _quantizer(ema=False, l2_normalize=l2_normalize).train()
    z = z0.clone().requires_grad_(True)
    q(z).codebook_loss.backward()
    assert z.grad is None and q.embedding.grad.abs().sum() > 0
    z = z0.clone().requires_grad_(True)
    q.embedding.grad = None
    q(z).commit_loss.backward()
    assert q.embedding.grad is None and z.grad.abs().sum() > 0
    # straight-through: the output's gradient goes to z (identity without normalization), never to the codebook
    z = z0.clone().requires_grad_(True)
    q(z).quantized.sum().backward()
    assert q.embedding.grad is None
    if not l2_normalize:
        assert torch.equal(z.grad, torch.ones_like(z))


def test_low_precision_inputs_give_fp32_indices_and_no_nans():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=K, codebook_dim=D, kmeans_iters=3)
    z = torch.randn(2, D, 8, 8).bfloat16()  # bf16-representable values
    q.train()
    q(z.float())
    q.eval()
    reference = q(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert torch.equal(out.indices, reference.indices)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    for t in (out.quantized, out.loss, out.commit_loss, out.perplexity):
        assert torch.isfinite(t).all()

    # fp16 latents whose squared norms overflow fp16 (> 65504): no inf/NaN, same codes as fp32
    q = VectorQuantizer(codebook_size=K, codebook_dim=D, kmeans_iters=3)
    z = (300.0 * torch.randn(2, D, 8, 8)).half()
    q.train()
    q(z.float())
    q.eval()
    reference = q(z.float())
    out = q(z)
    assert torch.equal(out.indices, reference.indices)
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.loss)


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restart_replaces_only_dead_codes(ema):
    torch.manual_seed(0)
    q = _quantizer(ema=ema, dead_code_steps=3).train()
    if ema:  # EMA statistics of 5 vectors per code, so the reset to 1 is visible
        q.cluster_size.fill_(5.0)
        q.embed_sum.copy_(5.0 * q.embedding)
    dead = [3, 7, 11]
    q.steps_unused.fill_(2)  # one step short of dead ...
    q.steps_unused[dead] = 3  # ... except these
    old = q.embedding.detach().clone()
    z = torch.randn(2, D, 4, 4)
    out = q(z)
    assert int(q.last_restarts) == len(dead) and int(q.num_restarts) == len(dead)

    if not ema:  # restarted from this batch's encoder outputs (the EMA step has moved them since)
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        for k in dead:
            assert (flat == q.embedding[k].detach()).all(dim=1).any(), f"code {k} is not a batch vector"
    used = set(out.indices.unique().tolist())
    if ema:
        untouched = [k for k in range(K) if k not in dead and k not in used]
        cs = q.cluster_size[dead]
        counts = torch.bincount(out.indices.reshape(-1), minlength=K).float()[dead]
        torch.testing.assert_close(cs, q.decay * 1.0 + (1 - q.decay) * counts)  # stats reset to one vector
    else:
        untouched = [k for k in range(K) if k not in dead]
    assert torch.equal(q.embedding.detach()[untouched], old[untouched])
    assert not torch.equal(q.embedding.detach()[dead], old[dead])
    assert all(k in used for k in dead)  # a restarted code sits on a batch vector, so it is used at once
    assert q.steps_unused[dead].eq(0).all()


def test_collapsed_codes_restart_after_dead_code_steps_and_window_usage():
    q = _quantizer(ema=False, dead_code_steps=3, usage_window=2).train()
    for _ in range(3):
        out = q(_z_near_codes(q, [0, 1, 2, 3]))
        assert int(q.last_restarts) == 0
        assert sorted(out.indices.unique().tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(q.window_usage(), torch.tensor(4 / K))
    q(_z_near_codes(q, [4, 5, 6, 7, 8]))  # 3 steps unused: the 28 others restart from these 5 vectors (+ noise)
    assert int(q.last_restarts) == K - 4 and int(q.num_restarts) == K - 4
    q.eval()
    before = q.window_usage()
    q(_z_near_codes(q, list(range(K))))  # eval: no statistics
    assert torch.equal(q.window_usage(), before)
    assert int(q.num_steps) == 4


# ---------------------------------------------------------------------------------------------- two processes

_SCENARIOS = {
    "ema": {"codebook_size": K, "ema": True, "l2_normalize": False},
    "ema_l2": {"codebook_size": K, "ema": True, "l2_normalize": True},
    "grad_small_batch": {"codebook_size": 128, "ema": False, "l2_normalize": False},  # fewer vectors (80) than codes
}
_RANK_BATCH = [(0, 2), (2, 5)]  # rank 0 gets 2 images, rank 1 gets 3
_STEPS = 6


def _global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    if step == 0:  # k-means sees a broad distribution ...
        return torch.randn(5, D, 4, 4, generator=g)
    return 1.0 + 0.2 * torch.randn(5, D, 4, 4, generator=g)  # ... then the data narrows and most codes die


def _run(scenario: str, rank_slice: tuple[int, int]) -> dict[str, torch.Tensor]:
    q = VectorQuantizer(codebook_dim=D, kmeans_iters=4, dead_code_steps=2, **_SCENARIOS[scenario]).train()
    logs = {}
    for step in range(_STEPS):
        z = _global_batch(step)[rank_slice[0] : rank_slice[1]]
        out = q(z)
        logs[f"usage_{step}"] = out.usage.reshape(1)
        logs[f"perplexity_{step}"] = out.perplexity.reshape(1)
        logs[f"restarts_{step}"] = q.last_restarts.reshape(1).clone()
        if step == 0:
            logs["kmeans_codebook"] = q.export_codebook().clone()
    state = {k: v.detach().clone() for k, v in q.state_dict().items()}
    state.update(logs)
    return state


def _worker(rank: int, world_size: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world_size)
    try:
        for scenario in _SCENARIOS:
            save_file(_run(scenario, _RANK_BATCH[rank]), os.path.join(root, f"{scenario}_rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_identical_codebooks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for scenario in _SCENARIOS:
        rank0 = load_file(tmp_path / f"{scenario}_rank0.safetensors")
        rank1 = load_file(tmp_path / f"{scenario}_rank1.safetensors")
        single = _run(scenario, (0, 5))  # one process, the concatenated batch
        assert rank0.keys() == rank1.keys() == single.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"{scenario}: {name} differs between ranks"
            if rank0[name].is_floating_point():
                torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-5, msg=name)
            else:
                assert torch.equal(rank0[name], single[name]), f"{scenario}: {name} differs from one process"
        assert int(rank0["initialized"]) == 1
        assert int(rank0["num_restarts"]) > 0, f"{scenario}: the test meant to force a dead-code restart"
        assert int(rank0["restarts_0"]) == 0 and int(rank0["restarts_1"]) == 0  # nothing dead right after k-means
