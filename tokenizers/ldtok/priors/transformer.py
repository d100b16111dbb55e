"""A small GPT over tokenizer codes (nanoGPT-style decoder-only transformer); the layout of codes in a sequence is
`ldtok.priors.layout.CodeLayout`.

`GPT` predicts the next token. Its input is a conditioning token (the class label, or a learned start token when
unconditional) followed by the codes, so the logits at position `i` are the distribution of code `i` given the label and
codes `0 .. i-1`: train with `model(codes[:, :-1], class_labels=y).logits` against `codes`. `GPT.generate` samples
with a key/value cache (one token per step) and optional temperature and top-k.

With `tokens_per_step=t > 1` (residual VQ's stages as *summed embeddings*, RQ-Transformer's input) a step is one code
position: its `t` tokens (one per stage / digit, each in its own vocabulary range) are embedded and summed, so the
sequence is `t` times shorter; the logits at step `i` give every token of position `i`, each read over its own range
(`CodeLayout.allowed_tokens`), independently of the others of that position. The default, one token per step, lays the
stages out as extra tokens, each conditioned on the previous ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import Tensor, nn


# ------------------------------------------------------------------------------------------------ the model
class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding."""

    def __init__(self, *, num_layers: int):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Tokens seen so far (by every layer, between forward calls)."""
        return self.layer_length(len(self.keys) - 1)

    def layer_length(self, layer: int) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append `k`, `v` `(B, heads, T, d)` of layer `layer`; returns all keys and values so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, *, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        assert hidden_size % num_heads == 0, f"hidden_size {hidden_size} not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor, *, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        T = x.shape[1]  # x: (B, T, hidden)
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        past = 0
        if cache is not None:
            past = cache.layer_length(layer)  # read per layer: earlier layers of this call already appended
            k, v = cache.update(layer, k, v)  # (B, heads, past + T, d)
        if past == 0:
            mask, is_causal = None, True
        else:  # query i (absolute position past + i) sees keys 0 .. past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, heads, T, d)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(ln(x))`, then `x + mlp(ln(x))`."""

    def __init__(self, *, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = CausalSelfAttention(hidden_size=hidden_size, num_heads=num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size, bias=False),
            nn.GELU(),
            nn.Linear(4 * hidden_size, hidden_size, bias=False),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, *, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), cache=cache, layer=layer)
        return x + self.mlp(self.norm2(x))


@dataclass
class GPTOutput:
    """Output of `GPT.forward`.

    Args:
        logits (`Tensor` of shape `(B, T, vocab_size)`): next-token logits; `T` counts the conditioning token when
            it was part of the input (a call without cache, or the first call with an empty one).
    """

    logits: Tensor


class GPT(ModelMixin, ConfigMixin):
    """Decoder-only transformer over code tokens, optionally class-conditional. Saved with `save_pretrained`.

    Args:
        vocab_size (`int`): tokens (`CodeLayout.vocab_size`).
        block_size (`int`): the longest input, conditioning token included; to model sequences of `L` codes use
            `block_size=L` (the last code is predicted, never fed).
        num_layers (`int`, defaults to 6): transformer blocks.
        num_heads (`int`, defaults to 8): attention heads; must divide `hidden_size`.
        hidden_size (`int`, defaults to 512): width of the residual stream.
        dropout (`float`, defaults to 0.0): dropout on embeddings, attention weights and MLP outputs.
        num_classes (`int`, defaults to 0): class-conditional when positive (the first token embeds the label);
            0: unconditional (the first token is a learned start token).
        tokens_per_step (`int`, defaults to 1): tokens embedded (summed) per input step and predicted per output
            step; `block_size` then counts steps (`CodeLayout.length // tokens_per_step`).
    """

    @register_to_config
    def __init__(
        self,
        *,
        vocab_size: int,
        block_size: int,
        num_layers: int = 6,
        num_heads: int = 8,
        hidden_size: int = 512,
        dropout: float = 0.0,
        num_classes: int = 0,
        tokens_per_step: int = 1,
    ):
        super().__init__()
        assert num_classes >= 0, f"num_classes must be >= 0, got {num_classes}"
        assert tokens_per_step >= 1, f"tokens_per_step must be >= 1, got {tokens_per_step}"
        self.token_embed = nn.Embedding(vocab_size, hidden_size)
        self.cond_embed = nn.Embedding(max(num_classes, 1), hidden_size)  # labels, or the single start token
        self.pos_embed = nn.Parameter(torch.zeros(1, block_size, hidden_size))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [Block(hidden_size=hidden_size, num_heads=num_heads, dropout=dropout) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                # GPT-2: residual projections scaled so the residual stream's variance does not grow with depth
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay on matrices (linear weights, embeddings), none on norms and biases."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def forward(
        self, codes: Tensor, *, class_labels: Tensor | None = None, cache: KVCache | None = None
    ) -> GPTOutput:
        """Next-token logits.

        Args:
            codes (`Tensor` of shape `(B, T)`, int64): tokens; may be empty (`T = 0`). With `tokens_per_step=t > 1`:
                `(B, T, t)`, the `t` tokens of each step, whose embeddings are summed.
            class_labels (`Tensor` of shape `(B,)`, int64, *optional*): required iff `num_classes > 0`; read only when
                the conditioning token is part of the input.
            cache (`KVCache`, *optional*): incremental decoding: an empty cache means the input starts with the
                conditioning token; a non-empty one continues after the tokens it holds.

        Returns:
            `GPTOutput` with logits `(B, T + 1, vocab_size)` when the conditioning token is prepended, else
            `(B, T, vocab_size)`.
        """
        B = codes.shape[0]  # codes: (B, T), or (B, T, t)
        past = cache.length if cache is not None else 0
        t = self.config.tokens_per_step
        assert codes.ndim == (2 if t == 1 else 3) and (t == 1 or codes.shape[2] == t), (
            f"codes of shape {tuple(codes.shape)} for tokens_per_step={t}")
        x = self.token_embed(codes)  # (B, T, hidden), or (B, T, t, hidden)
        x = x.sum(dim=2) if t > 1 else x  # summed embeddings: one step per code position
        if past == 0:
            if self.config.num_classes > 0:
                assert class_labels is not None and class_labels.shape == (B,), "a class-conditional GPT needs labels"
                cond = self.cond_embed(class_labels)  # (B, hidden)
            else:
                assert class_labels is None, "class_labels given to an unconditional GPT (num_classes=0)"
                cond = self.cond_embed.weight[0].expand(B, -1)
            x = torch.cat([cond[:, None], x], dim=1)  # (B, 1 + T, hidden)
        end = past + x.shape[1]
        assert end <= self.config.block_size, f"{end} tokens exceed block_size {self.config.block_size}"
        x = self.drop(x + self.pos_embed[:, past:end])
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache, layer=i)
        return GPTOutput(logits=self.head(self.norm(x)))  # (B, end - past, vocab)

    @torch.no_grad()
    def generate(
        self,
        *,
        num_samples: int,
        length: int,
        class_labels: Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        allowed_tokens: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample `num_samples` sequences of `length` tokens, one token per step with a key/value cache.

        Args:
            num_samples (`int`): sequences `B`.
            length (`int`): tokens per sequence (at most `block_size * tokens_per_step`, a multiple of
                `tokens_per_step`).
            class_labels (`Tensor` of shape `(B,)`, *optional*): labels of a class-conditional model.
            temperature (`float`, defaults to 1.0): logits are divided by it; must be positive.
            top_k (`int`, *optional*): sample among the `top_k` most likely (allowed) tokens only; 1 is greedy.
            allowed_tokens (`Tensor` of shape `(length, vocab_size)`, bool, *optional*): tokens each position may
                take (`CodeLayout.allowed_tokens()`).
            generator (`torch.Generator`, *optional*): on the model's device, for reproducible samples.

        Returns:
            `Tensor` of shape `(B, length)`, int64.
        """
        assert temperature > 0, f"temperature must be positive, got {temperature}"
        t = self.config.tokens_per_step
        assert length % t == 0, f"length {length} is not a multiple of tokens_per_step {t}"
        assert length <= self.config.block_size * t, f"length {length} exceeds block_size {self.config.block_size}"
        device = self.token_embed.weight.device
        if allowed_tokens is not None:
            allowed_tokens = allowed_tokens.to(device)
        out = torch.empty(num_samples, length, dtype=torch.long, device=device)
        cache = KVCache(num_layers=len(self.blocks))
        x = torch.empty(num_samples, 0, *([t] if t > 1 else []), dtype=torch.long, device=device)
        for step in range(length // t):
            logits = self(x, class_labels=class_labels, cache=cache).logits[:, -1].float() / temperature  # (B, V)
            for i in range(step * t, (step + 1) * t):  # the step's tokens, each over its own range
                out[:, i] = self._sample_token(logits, None if allowed_tokens is None else allowed_tokens[i], top_k,
                                               generator)
            x = out[:, step * t : (step + 1) * t]
            x = x[:, None] if t > 1 else x  # (B, 1, t), or (B, 1)
        return out

    @staticmethod
    def _sample_token(logits: Tensor, allowed: Tensor | None, top_k: int | None,
                      generator: torch.Generator | None) -> Tensor:
        """`(B,)` tokens drawn from `logits` `(B, V)` (already divided by the temperature), within `allowed` `(V,)`."""
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


__all__ = ["GPT", "GPTOutput", "KVCache"]
