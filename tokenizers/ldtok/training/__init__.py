"""Training: one loop (`loop.py`) under HF Accelerate that the autoencoder trainer and both prior trainers run on.

- `config.py`: `TrainLoopConfig` (the keys the loop reads), the autoencoders' `TrainConfig` and `RunConfig`.
- `schedule.py`: the learning-rate schedule (`learning_rate`).
- `loop.py`: `TrainingLoop` (Accelerate setup, resume, checkpoints, epochs, schedule, non-finite guard, logging)
  and `Task`, what a trainer brings to it (its models, optimizers, step, exports).
- `autoencoder.py`: `AutoencoderStep`, the autoencoder's losses of one step (also run by the training benchmark).
- `trainer.py`: `train(config)`, the autoencoder trainer of `train/vae.py` and `train/vq.py`.
- `shaping.py`: its latent-shaping options (issue 13): per-batch noise, masks and EQ-VAE transforms (`BatchShaping`),
  the alignment model and projection (`Alignment`), and the families that have them.
- `summary.py`: the final export, `summary.json` and `summary_lines`.

The priors' tasks live in `ldtok.priors` (`diffusion_trainer.py`, `transformer_trainer.py`).
"""

from importlib import import_module

_EXPORTS = {
    "AutoencoderStep": ".autoencoder",
    "LossStep": ".autoencoder",
    "weights_checksum": ".autoencoder",
    "RunConfig": ".config",
    "TrainConfig": ".config",
    "TrainLoopConfig": ".config",
    "learning_rate": ".schedule",
    "set_learning_rates": ".schedule",
    "Task": ".loop",
    "TrainingLoop": ".loop",
    "train": ".trainer",
    "summary_lines": ".summary",
    "list_checkpoints": "..checkpoint",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ldtok.training' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
