"""LFQ / BSQ entropy over 2 gloo processes equals one process on the concatenated batch (value and gradient), and
every rank of every quantizer holds the same state."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from ldtok.quantizers import QuantizerConfig, build_quantizer

WORLD = 2
PER_RANK = 2  # images per rank; equal, so that DDP's gradient average is the global mean's gradient
STEPS = 3
SCENARIOS = {
    "lfq": dict(type="lfq", codebook_dim=6, beta=0.0, entropy_weight=0.5),
    "lfq-groups": dict(type="lfq", codebook_dim=6, beta=0.0, entropy_groups=3),
    "bsq": dict(type="bsq", codebook_dim=6, beta=0.0),
    "fsq": dict(type="fsq", levels=[5, 5, 3]),
    "residual": dict(type="residual", codebook_size=8, codebook_dim=4, num_stages=2, dead_code_steps=1,
                     quantize_dropout=0.5),
}


def global_batch(step: int, channels: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return 0.5 * torch.randn(WORLD * PER_RANK, channels, 3, 3, generator=g)


def run(name: str, rows: slice) -> dict[str, torch.Tensor]:
    """`STEPS` training steps on `rows` of each global batch: losses, input gradients and the final state."""
    config = QuantizerConfig(**SCENARIOS[name])
    quantizer = build_quantizer(config)
    result = {}
    for step in range(STEPS):
        z = global_batch(step, config.codebook_dim)[rows].clone().requires_grad_(True)
        out = quantizer(z)
        (out.loss + out.quantized.pow(2).mean()).backward()
        result[f"loss_{step}"] = out.loss.detach()
        result[f"grad_{step}"] = z.grad
        result[f"usage_{step}"] = out.usage
        if out.entropy_loss is not None:
            result[f"entropy_{step}"] = out.entropy_loss.detach()
    result.update({f"state.{k}": v for k, v in quantizer.state_dict().items()})
    return result


def worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=WORLD)
    try:
        for name in SCENARIOS:
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            save_file({k: v.contiguous() for k, v in run(name, rows).items()},
                      os.path.join(root, f"{name}_rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_entropy_and_state_over_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for name, spec in SCENARIOS.items():
        ranks = [load_file(tmp_path / f"{name}_rank{r}.safetensors") for r in range(WORLD)]
        single = run(name, slice(0, WORLD * PER_RANK))
        state = [k for k in single if k.startswith("state.")]
        assert state, name
        for key in state:  # every rank holds the same state, that of one process on the whole batch
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{name}: {key} differs between ranks"
            torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        for step in range(STEPS):
            usage = [r[f"usage_{step}"] for r in ranks]
            assert torch.equal(usage[0], usage[1]) and torch.allclose(usage[0], single[f"usage_{step}"])
            if spec["type"] not in ("lfq", "bsq"):
                continue
            for key in (f"loss_{step}", f"entropy_{step}"):
                assert torch.equal(ranks[0][key], ranks[1][key]), f"{name}: {key} differs between ranks"
                torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
            # each rank's gradient is WORLD times its share of the global one: DDP's average is the global gradient
            for r in range(WORLD):
                expected = WORLD * single[f"grad_{step}"][r * PER_RANK : (r + 1) * PER_RANK]
                torch.testing.assert_close(ranks[r][f"grad_{step}"], expected, rtol=1e-4, atol=1e-6,
                                           msg=f"{name}: rank {r} gradient at step {step}")
