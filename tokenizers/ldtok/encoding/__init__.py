"""The encode engine: `encode_dataset(EncodeConfig) -> EncodeResult` writes a dataset's latents into resumable
shards (`ldtok encode` is a thin adapter over it; the benchmark and the tests call it in-process).

- `config.py`: `EncodeConfig` (one field per `ldtok encode` flag) and `EncodeResult` (counts, rate, memory, manifest);
- `engine.py`: `encode_dataset` and its steps (writer, loader, the batch loop, `index.json`);
- `transforms.py`: `ResizeTransform` (`crop="resize"`), `RankStream` (a stream's rows of one rank);
- `statistics.py`: code usage, the KL scale written into the model's config, the non-finite check;
- `resume.py`: what an existing shard directory allows (resume with the same model, or `overwrite`).
"""

from .config import EncodeConfig, EncodeResult
from .engine import encode_dataset, encode_views
from .statistics import code_usage, write_latent_statistics
from .transforms import RankStream, ResizeTransform

__all__ = ["EncodeConfig", "EncodeResult", "RankStream", "ResizeTransform", "code_usage", "encode_dataset",
           "encode_views", "write_latent_statistics"]
