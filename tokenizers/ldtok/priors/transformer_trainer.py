"""The autoregressive prior's part of the training loop (`train/prior_transformer.py`): a `GPT` on code sequences
(`CodeLayout`; residual stages as extra tokens or, with `residual_stages=summed`, as summed embeddings), next-token
cross-entropy, its sampler and the decoding of sampled codes."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from einops import rearrange
from safetensors.torch import save
from torch.utils.data import DataLoader

from ..atomic import write_bytes_atomic
from ..ema import ModelEMA
from ..models import save_pretrained_atomic
from ..training.loop import TrainingLoop
from .config import PriorTransformerConfig
from .layout import CodeLayout
from .task import PriorTask
from .transformer import GPT


class TransformerPriorTask(PriorTask):
    """Next-token cross-entropy over the whole code sequence, through the prepared GPT."""

    name = "prior-transformer"

    def __init__(self, loop: TrainingLoop, config: PriorTransformerConfig, *, layout: CodeLayout,
                 loader: DataLoader):
        super().__init__(loop)
        tc, m = config.train, config.model
        self.config, self.layout, self.conditional = config, layout, m.num_classes is not None
        self.tokens_per_step = t = layout.tokens_per_step(config.residual_stages)
        model = GPT(vocab_size=layout.vocab_size, block_size=layout.length // t, num_layers=m.num_layers,
                    num_heads=m.num_heads, hidden_size=m.hidden_size, dropout=m.dropout,
                    num_classes=m.num_classes or 0, tokens_per_step=t)
        # summed stages: the logits of a step, read once per token of the next position, each over its own range
        self.token_ranges = layout.allowed_tokens().view(layout.length // t, t, -1) if t > 1 else None
        optimizer = torch.optim.AdamW(model.parameter_groups(tc.weight_decay), lr=tc.lr, betas=tuple(tc.adam_betas))
        self.ema = ModelEMA(model, decay=tc.ema_decay) if tc.ema_decay else None
        self.model, self.optimizer, self.loader = loop.accelerator.prepare(model, optimizer, loader)
        set_seed(tc.seed, device_specific=True)  # same init on every rank (above); from here, per-rank noise
        self.raw_model = self.ema_source = loop.accelerator.unwrap_model(self.model)
        if self.ema is not None:
            self.ema.to(loop.accelerator.device)
        self.trained, self.weights = [self.model], {"transformer": self.raw_model}
        self.optimizers = [(self.optimizer, tc.lr)]

    def step(self, batch, step: int) -> dict[str, torch.Tensor]:
        tokens = self.layout.pack(batch)  # (B, L)
        labels = batch["label"] if self.conditional else None
        loss = self.loss(tokens, labels)
        self.loop.update(loss, self.optimizer, self.model)
        return self.record(loss)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Next-token cross-entropy of sequences `tokens` `(B, L)`, through the prepared (wrapped) GPT."""
        t = self.tokens_per_step
        if t == 1:
            logits = self.model(tokens[:, :-1], class_labels=labels).logits  # (B, L, V)
            return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        steps = rearrange(tokens, "b (p t) -> b p t", t=t)  # (B, P, t): a position's stages per step
        logits = self.model(steps[:, :-1], class_labels=labels).logits.float()  # (B, P, V)
        ranges = self.token_ranges.to(logits.device)  # (P, t, V)
        logits = logits[:, :, None].masked_fill(~ranges, float("-inf"))  # (B, P, t, V), each token's own range
        return F.cross_entropy(logits.flatten(0, 2), tokens.flatten())

    @property
    def final_model(self) -> GPT:
        return (self.ema.model if self.ema is not None else self.raw_model).eval()

    def save_extra(self, path: Path) -> None:
        save_pretrained_atomic(self.ema.model if self.ema is not None else self.raw_model, path / "transformer")

    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        """`num_samples` code maps `{field: (N, h, w)}`, the shards' fields (residual VQ: one per stage; temperature,
        top-k; classes cycling, as `label`)."""
        config, device = self.config, self.loop.accelerator.device
        generator = torch.Generator(device).manual_seed(config.train.seed)
        labels = torch.arange(num_samples, device=device) % config.model.num_classes if self.conditional else None
        with self.loop.accelerator.autocast():
            tokens = self.final_model.generate(num_samples=num_samples, length=self.layout.length,
                                               class_labels=labels, temperature=config.temperature,
                                               top_k=config.top_k, allowed_tokens=self.layout.allowed_tokens(),
                                               generator=generator)
        codes = self.layout.unpack(tokens)  # {field: (N, h, w)}
        if labels is not None:
            codes["label"] = labels
        return codes


def save_codes(codes: dict[str, torch.Tensor], path: Path) -> Path:
    """The sampled codes (and labels) as one safetensors file, written atomically."""
    write_bytes_atomic(path, save({name: c.cpu().contiguous() for name, c in codes.items()}))
    return path


@torch.no_grad()
def decode_samples(tokenizer, codes: dict[str, torch.Tensor], *, device: torch.device) -> torch.Tensor:
    """Images `(N, 3, H, W)` of sampled code maps, decoded in chunks of 16 on `device`."""
    tokenizer.to(device)
    codes = {k: v for k, v in codes.items() if k != "label"}
    N = next(iter(codes.values())).shape[0]
    return torch.cat([tokenizer.decode_fields({k: v[i : i + 16] for k, v in codes.items()}).float()
                      for i in range(0, N, 16)])


__all__ = ["TransformerPriorTask", "decode_samples", "save_codes"]
