r"""A GPT-2-style causal decoder in plain PyTorch (no ``transformers``).

Architecture of GPT-2 (Radford et al., 2019) as in Hugging Face's ``GPT2LMHeadModel``:
learned token and position embeddings; ``n_layer`` pre-LayerNorm blocks, each
:math:`h \leftarrow h + \mathrm{Attn}(\mathrm{LN}(h))`, :math:`h \leftarrow h +
\mathrm{MLP}(\mathrm{LN}(h))` with causal multi-head self-attention and a 4× GELU (tanh
approximation, "gelu_new") MLP; a final LayerNorm; and an LM head tied to the token embedding
(logits :math:`= h W_{te}^\top`, no bias). No dropout (the paper's code never enabled it).

The paper used ``GPT2Config('gpt2')`` (12 layers, width 768, 12 heads, 1024 positions) with
``vocab_size=10000``, randomly initialised. The ``"paper"`` init follows the Flax GPT-2 it ran:
every linear kernel and both embeddings :math:`\sim\mathcal N(0, 0.02^2)`, zero biases, LayerNorm
scale 1 and offset 0 [inferred from the library defaults]. ``"torch"`` keeps PyTorch's module
defaults.

Attention defaults to an explicit ("math") implementation, which supports forward-mode AD
(``torch.func.jvp``, needed by the GGN/Fisher curvature) and double backward (Hessian);
``attention="sdpa"`` uses :func:`torch.nn.functional.scaled_dot_product_attention`, faster for
long sequences; its fused kernels lack forward-mode AD, so qlrlab's own extra passes select the
math kernel (:func:`qlrlab._passes.differentiable_attention`) and the two give the same steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlrlab.models.init import InitScheme

__all__ = ["GPT", "CausalSelfAttention", "DecoderBlock"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection (GPT-2 ``c_attn``).

    Args:
        n_embd: model width.
        n_head: number of heads (must divide ``n_embd``).
        attention: ``"math"`` (explicit softmax; forward-mode AD safe) or ``"sdpa"``.
    """

    def __init__(self, n_embd: int, n_head: int, attention: Literal["math", "sdpa"] = "math"):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.n_embd = n_embd
        self.attention = attention
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, C] -> [B, T, C]``; position :math:`t` attends to positions :math:`\\le t`."""
        b, t, c = x.shape
        hd = c // self.n_head
        q, k, v = self.c_attn(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, hd).transpose(1, 2)
        k = k.view(b, t, self.n_head, hd).transpose(1, 2)
        v = v.view(b, t, self.n_head, hd).transpose(1, 2)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
            y = torch.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: attention and 4× GELU MLP, each with a residual.

    Args:
        n_embd: model width.
        n_head: number of heads.
        layer_norm_eps: LayerNorm epsilon.
        attention: attention implementation (see :class:`CausalSelfAttention`).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        layer_norm_eps: float = 1e-5,
        attention: Literal["math", "sdpa"] = "math",
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=layer_norm_eps)
        self.attn = CausalSelfAttention(n_embd, n_head, attention)
        self.ln_2 = nn.LayerNorm(n_embd, eps=layer_norm_eps)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """One block on ``[B, T, C]``."""
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2-style language model (see the module docstring).

    Args:
        vocab_size: vocabulary size (PTB: 10,000).
        n_layer: number of blocks (GPT-2 small: 12).
        n_embd: width (768).
        n_head: attention heads (12).
        n_positions: maximum sequence length (1024).
        layer_norm_eps: LayerNorm epsilon (1e-5).
        init: ``"paper"`` (GPT-2 normal(0, 0.02) init) or ``"torch"``.
        initializer_range: standard deviation of the ``"paper"`` init.
        attention: ``"math"`` (default; forward-mode AD safe) or ``"sdpa"``.
        flatten_output: return logits as ``[B·T, V]`` (what ``nn.CrossEntropyLoss`` and the
            closed-form output Hessians expect, with targets ``[B·T]``) instead of ``[B, T, V]``.
    """

    def __init__(
        self,
        vocab_size: int = 10000,
        n_layer: int = 12,
        n_embd: int = 768,
        n_head: int = 12,
        n_positions: int = 1024,
        layer_norm_eps: float = 1e-5,
        init: InitScheme = "paper",
        initializer_range: float = 0.02,
        attention: Literal["math", "sdpa"] = "math",
        flatten_output: bool = False,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.flatten_output = flatten_output
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.blocks = nn.ModuleList(
            DecoderBlock(n_embd, n_head, layer_norm_eps, attention) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, eps=layer_norm_eps)
        if init == "paper":
            self._gpt2_init(initializer_range)
        elif init != "torch":
            raise ValueError(f"unknown init {init!r}")

    @torch.no_grad()
    def _gpt2_init(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()  # type: ignore[operator]
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits for token ids ``[B, T]`` (``T ≤ n_positions``).

        Returns:
            ``[B, T, V]``, or ``[B·T, V]`` with ``flatten_output``.
        """
        b, t = idx.shape
        if t > self.n_positions:
            raise ValueError(f"sequence length {t} exceeds n_positions={self.n_positions}")
        pos = torch.arange(t, device=idx.device)
        h = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            h = block(h)
        logits = self.ln_f(h) @ self.wte.weight.T
        return logits.reshape(b * t, -1) if self.flatten_output else logits
