"""What a batch given to `ShardWriter.add` must look like: the latent kind's fields (all `_flip` twins or none), an
optional `label`, and per field the stored dtype, per-sample shape and description recorded in the shard."""

from __future__ import annotations

import torch
from torch import Tensor

from ..latent_kinds import GAUSSIAN_DTYPES, LatentKind


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_batch(latent: LatentKind, batch: dict[str, Tensor], B: int, *, index_dtype: torch.dtype | None
                   ) -> dict[str, dict]:
    """`{field: {"dtype", "shape", "description"}}` of a batch of `B` rows, checked against `latent`'s fields.

    Raises:
        `ValueError` naming the field: unknown or missing fields, a partial set of `_flip` twins, wrong row counts,
        shapes or dtypes (Gaussian fields: `(B, C, h, w)` floats of one dtype; indices: `(B, h, w)` integers,
        stored as `index_dtype`; residual VQ gives one such field per stage, `indices_stage0`, ...).
    """
    required = latent.fields
    flip = [f"{name}_flip" for name in required]
    allowed = set(required) | set(flip) | {"label"}
    unknown = sorted(set(batch) - allowed)
    if unknown:
        raise ValueError(f"kind={latent.name!r} shards take fields {sorted(allowed)}; got unknown {unknown}")
    missing = [name for name in required if name not in batch]
    if missing or (any(f in batch for f in flip) and not all(f in batch for f in flip)):
        raise ValueError(f"kind={latent.name!r} needs all of {list(required)} (and all or none of {flip})")
    fields = {}
    for name, t in batch.items():
        if t.shape[0] != B:
            raise ValueError(f"field {name!r} has {t.shape[0]} rows for {B} ids")
        if name == "label":
            if t.ndim != 1 or t.dtype.is_floating_point:
                raise ValueError(f"label must be a (B,) integer tensor, got {t.dtype} {tuple(t.shape)}")
            dtype = torch.int64
        elif latent.gaussian:
            if t.ndim != 4 or t.dtype not in GAUSSIAN_DTYPES:
                raise ValueError(
                    f"{name!r} must be (B, C, h, w) in one of {GAUSSIAN_DTYPES}, got {t.dtype} {tuple(t.shape)}"
                )
            dtype = t.dtype
        else:
            if t.ndim != 3 or t.dtype.is_floating_point:  # residual VQ: one (B, h, w) field per stage
                raise ValueError(f"{name!r} must be a (B, h, w) integer tensor (residual VQ: one field per stage), "
                                 f"got {t.dtype} {tuple(t.shape)}")
            dtype = index_dtype
        fields[name] = {"dtype": dtype_name(dtype), "shape": list(t.shape[1:]), "description": latent.description(name)}
    if latent.gaussian and len({fields[n]["dtype"] for n in fields if n != "label"}) != 1:
        raise ValueError(f"all KL fields must share one dtype, got {fields}")
    return fields
