"""The one attention function of minisd.

Every attention in Stable Diffusion is scaled dot-product attention,
softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1):

- the U-Net's self- and cross-attention (multi-head, `(B, L, heads * d)` tokens);
- the VAE's mid-block attention (one head over the `h * w` pixels);
- the CLIP / OpenCLIP text transformers (multi-head, causal).

They all go through `attention()` below, which calls
`torch.nn.functional.scaled_dot_product_attention`, so PyTorch picks the fused
kernel (flash / memory-efficient / math) for the device and dtype. There are no
backend flags and no xformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    heads: int,
    is_causal: bool = False,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention over token sequences.

    Args:
        q: queries, `(B, Lq, heads * d)`.
        k, v: keys and values, `(B, Lk, heads * d)`.
        heads: number of heads; the channel axis is split as `(heads d)`,
            the order used by both the official code and diffusers.
        is_causal: mask out keys after each query (CLIP's text transformer).
        mask: optional additive float mask or boolean keep-mask broadcastable
            to `(B, heads, Lq, Lk)`.
        chunk_size: if set, process the queries in chunks of this many tokens.
            Each query attends independently of the others, so this is exact;
            it bounds the `(Lq, Lk)` score matrix of the math kernel for very
            large images on small GPUs.

    Returns:
        `(B, Lq, heads * d)`.
    """
    if q.shape[-1] % heads != 0:
        raise ValueError(f"attention: {q.shape[-1]} channels do not split into {heads} heads")
    q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    if chunk_size is None or chunk_size >= q.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    else:
        if is_causal:
            # A causal mask for a chunk depends on the chunk's offset; the text
            # transformers never need chunking (77 tokens), so keep this simple.
            raise ValueError("attention: chunk_size cannot be combined with is_causal")
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, i : i + chunk_size],
                    k,
                    v,
                    attn_mask=_rows(mask, i, chunk_size),
                )
                for i in range(0, q.shape[2], chunk_size)
            ],
            dim=2,
        )
    return rearrange(out, "b h l d -> b l (h d)")


def _rows(mask: torch.Tensor | None, start: int, size: int) -> torch.Tensor | None:
    """The query rows `start:start+size` of a mask (a broadcast row axis stays as is)."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., start : start + size, :]
