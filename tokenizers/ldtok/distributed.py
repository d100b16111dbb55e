"""Every collective ldtok calls, in one place: no-ops (identity) when `torch.distributed` is not initialized.

Every helper here except `is_distributed`, `rank`, `world_size` and `collective_device` is a *collective* when a
process group exists: all ranks must call it, in the same order, with tensors of the same shape (except where a helper
says otherwise). Code elsewhere in the library never calls `torch.distributed` or an accelerator's
`reduce`/`gather` directly; it calls these, so single-process runs, Accelerate runs and plain `torchrun` behave alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a default process group is initialized (and there is anyone to talk to)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def collective_device() -> torch.device:
    """The device exchange tensors must live on: the current CUDA device under NCCL, else the CPU (gloo)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: Tensor, *, op: str = "sum") -> Tensor:
    """Reduce `tensor` in place over all ranks with `op` (`"sum"`, `"max"` or `"min"`) and return it."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_reduce_values(values: list[float], *, op: str = "sum", device: torch.device | None = None) -> list[float]:
    """Reduce a list of Python numbers over all ranks (fp64); identical on every rank."""
    t = torch.tensor(values, dtype=torch.float64, device=device or collective_device())
    return all_reduce_(t, op=op).tolist()


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (`[obj]` without a process group)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(local: Tensor) -> list[Tensor]:
    """Every rank's `local` (same shape on every rank), in rank order."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [local]
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return out


def broadcast_(tensor: Tensor, *, src: int = 0) -> Tensor:
    """Overwrite `tensor` in place with rank `src`'s copy and return it."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def destroy() -> None:
    """Tear down the default process group if one exists (end of a command run under torchrun/accelerate)."""
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` in place over all ranks and return it. Every rank ends with the same bits."""
    return all_reduce_(tensor, op="sum")


def all_gather_sizes(n: int, *, device: torch.device) -> list[int]:
    """Gather one integer (e.g. this rank's number of rows) from every rank, in rank order.

    Args:
        n (`int`): this rank's value; may differ between ranks.
        device (`torch.device`): device of the exchange tensor (CUDA under NCCL, CPU under gloo).

    Returns:
        `list[int]` of length `world_size`, identical on every rank.
    """
    return [int(t.item()) for t in all_gather_tensor(torch.tensor([n], dtype=torch.int64, device=device))]


def gather_rows(local: Tensor, global_indices: Tensor, sizes: list[int]) -> Tensor:
    """Fetch rows of the rank-ordered concatenation of every rank's `local` without gathering all of it.

    Each rank writes the rows it owns into a zero tensor and the result is summed over ranks; adding zeros is exact,
    so every rank gets bit-identical copies of the selected rows. Communication is `(M, D)`, not `(sum(sizes), D)`.

    Args:
        local (`Tensor` of shape `(N_rank, D)`): this rank's rows; `N_rank` may differ between ranks.
        global_indices (`Tensor` of shape `(M,)`, int64): indices into the concatenation `cat([local_0, local_1, ...])`;
            must be identical on every rank.
        sizes (`list[int]`): every rank's `N_rank`, from `all_gather_sizes`.

    Returns:
        `Tensor` of shape `(M, D)`, dtype and device of `local`, identical on every rank.
    """
    offset = sum(sizes[: rank()])
    global_indices = global_indices.to(local.device)
    mine = (global_indices >= offset) & (global_indices < offset + local.shape[0])
    out = local.new_zeros(global_indices.shape[0], local.shape[1])
    out[mine] = local[global_indices[mine] - offset]
    return all_reduce_sum_(out)


def global_mean_with_local_grad(local_sum: Tensor, local_count: Tensor | float) -> Tensor:
    """Mean over every rank's rows whose gradient reaches this rank's rows (a collective; fp32).

    The value is `sum_r local_sum_r / sum_r local_count_r`, bit-identical on every rank and equal to the mean of the
    concatenated batch in one process. The gradient flows through this rank's `local_sum` only, scaled by the world
    size, because DDP averages the ranks' gradients: after its all-reduce every parameter receives the gradient of the
    global mean, exactly as one process on the concatenated batch would compute it.

    Args:
        local_sum (`Tensor`, any shape): this rank's sum over its rows (differentiable).
        local_count (`Tensor` or `float`): this rank's number of rows.
    """
    count = torch.as_tensor(local_count, dtype=local_sum.dtype, device=local_sum.device).clone()
    total = all_reduce_sum_(local_sum.detach().clone())
    all_reduce_sum_(count)
    W = float(world_size())
    # value: total + 0 exactly; gradient: W * d(local_sum)
    return (total + (W * local_sum - (W * local_sum).detach())) / count
