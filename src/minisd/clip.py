"""The CLIP / OpenCLIP text transformers that condition Stable Diffusion.

One causal pre-LN transformer (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision", sec. 2.4) serves all three encoders:

- SD1 and SDXL's first encoder: OpenAI CLIP ViT-L/14's text tower (`CLIP_VIT_L14`);
- SD2: OpenCLIP ViT-H/14 (`OPENCLIP_VIT_H14`);
- SDXL base (second encoder) and refiner: OpenCLIP ViT-bigG/14 (`OPENCLIP_VIT_BIGG14`).

Modules are named like open_clip's `TextTransformer` (`transformer.resblocks.N.attn.in_proj_weight`,
`ln_final`, `text_projection`), so an OpenCLIP tower of an official file loads by a prefix strip.
The HF transformers layout (SD1/SDXL files, diffusers folders) is the `layouts.hf_table` key table.

Which output each model uses as its context is the conditioning code's business:
SD1 takes `last_hidden_state`; SD2 takes `ln_final` of the penultimate block's output;
SDXL takes the penultimate `hidden_states` (no `ln_final`) and bigG's `pooled`.
Where each encoder sits in official files and diffusers folders is `families.py`'s table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minisd.attention import attention

# Sanity bounds of `TextConfig.__post_init__`, far above the released towers (bigG: 1280 wide, 32 layers;
# 49408 tokens, 77 positions): a mistyped or hostile config (a config.json claiming 10**7 layers) fails
# at once instead of building modules for minutes.
_MAX_WIDTH = 1 << 16
_MAX_LAYERS = 1024
_MAX_VOCAB = 1 << 22
_MAX_CONTEXT = 1 << 16


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    """A ValueError naming `TextConfig.name` unless `value` is an int (not a bool) in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"TextConfig.{name} must be an int, got {type(value).__name__} {repr(value)[:60]}")
    if not lo <= value <= hi:
        bound = " (a sanity bound far above any released model)" if value > hi else ""
        raise ValueError(f"TextConfig.{name} must be in [{lo}, {hi}]{bound}, got {value}")


@dataclass(frozen=True)
class TextConfig:
    """Hyperparameters of a text transformer (open_clip's `CLIPTextCfg` names where they exist)."""

    width: int  # model width (HF `hidden_size`)
    heads: int  # attention heads, each `width // heads` wide
    layers: int  # residual attention blocks (HF `num_hidden_layers`)
    mlp_width: int  # hidden units of each block's MLP (HF `intermediate_size`; open_clip `width * mlp_ratio`)
    act: str  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP, exact erf form)
    projection_dim: int | None  # columns of `text_projection`; None: the weights have no projection
    vocab_size: int = 49408  # rows of token_embedding: CLIP's BPE vocabulary (tokenizer.VOCAB_SIZE)
    context_length: int = 77  # positions of `positional_embedding`
    layer_norm_eps: float = 1e-5  # torch's default, used by open_clip, OpenAI CLIP and HF alike

    def __post_init__(self) -> None:
        """Check the type and range of every field, then how they fit together."""
        for name, lo, hi in (("width", 1, _MAX_WIDTH), ("heads", 1, _MAX_WIDTH), ("layers", 0, _MAX_LAYERS),
                             ("mlp_width", 1, 4 * _MAX_WIDTH), ("vocab_size", 1, _MAX_VOCAB),
                             ("context_length", 1, _MAX_CONTEXT)):
            _check_int(name, getattr(self, name), lo, hi)
        if self.projection_dim is not None:
            _check_int("projection_dim", self.projection_dim, 1, _MAX_WIDTH)
        if not isinstance(self.act, str) or self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"TextConfig.act must be 'quick_gelu' or 'gelu', got {repr(self.act)[:60]}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"TextConfig.layer_norm_eps must be a number in (0, 1), got {repr(eps)[:60]}")
        if self.width % self.heads != 0:
            raise ValueError(f"TextConfig: width {self.width} does not split into {self.heads} heads")

    @property
    def eot_token_id(self) -> int:
        """`<|endoftext|>`, the last vocabulary entry (tokenizer.EOT_TOKEN_ID, 49407), where pooling reads."""
        return self.vocab_size - 1

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any], *, projection: bool) -> TextConfig:
        """The config of a transformers `CLIPTextConfig` dict (a diffusers `text_encoder*/config.json`).

        `projection` says whether the weights hold `text_projection.weight`
        (`CLIPTextModelWithProjection`); a plain `CLIPTextModel` config still carries a
        `projection_dim` (e.g. 512 in SD2's), which then describes nothing and is dropped."""
        needed = ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "hidden_act",
                  "vocab_size", "max_position_embeddings", "layer_norm_eps"] + ["projection_dim"] * projection
        missing = [k for k in needed if k not in d]
        if missing:
            raise ValueError(f"HF CLIP text config lacks {missing}")
        return cls(
            width=int(d["hidden_size"]), heads=int(d["num_attention_heads"]), layers=int(d["num_hidden_layers"]),
            mlp_width=int(d["intermediate_size"]), act=str(d["hidden_act"]),
            projection_dim=int(d["projection_dim"]) if projection else None,
            vocab_size=int(d["vocab_size"]), context_length=int(d["max_position_embeddings"]),
            layer_norm_eps=float(d["layer_norm_eps"]),
        )


# OpenAI CLIP ViT-L/14 text tower, as SD1 (ldm FrozenCLIPEmbedder) and SDXL (embedders.0) store it: HF
# `CLIPTextModel`, without projection. open_clip model_configs/ViT-L-14.json text_cfg (768 wide, 12 heads,
# 12 layers, mlp_ratio 4) = HF openai/clip-vit-large-patch14 text_config (intermediate_size 3072,
# hidden_act "quick_gelu": OpenAI trained with QuickGELU, hence open_clip's "-quickgelu" configs).
CLIP_VIT_L14 = TextConfig(width=768, heads=12, layers=12, mlp_width=3072, act="quick_gelu", projection_dim=None)
# OpenCLIP ViT-H/14 (laion2b_s32b_b79k), SD2's encoder: open_clip model_configs/ViT-H-14.json text_cfg
# (1024 wide, 16 heads, 24 layers, mlp_ratio 4), embed_dim 1024, nn.GELU (quick_gelu false).
OPENCLIP_VIT_H14 = TextConfig(width=1024, heads=16, layers=24, mlp_width=4096, act="gelu", projection_dim=1024)
# OpenCLIP ViT-bigG/14 (laion2b_s39b_b160k), SDXL: open_clip model_configs/ViT-bigG-14.json text_cfg
# (1280 wide, 20 heads, 32 layers, mlp_ratio 4), embed_dim 1280; = diffusers SDXL text_encoder_2/config.json.
OPENCLIP_VIT_BIGG14 = TextConfig(width=1280, heads=20, layers=32, mlp_width=5120, act="gelu", projection_dim=1280)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype.

    OpenAI CLIP's `LayerNorm` (clip/model.py) does exactly this "to handle fp16". open_clip uses it
    (`LayerNormFp32`) only for fp16/bf16 towers and otherwise runs F.layer_norm in the input dtype,
    but the official SD code calls it under autocast, which runs layer_norm in fp32 anyway; HF's
    `nn.LayerNorm` on CUDA accumulates in fp32 too. In fp32 all of these are the same op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm computed in fp32: (..., C) -> (..., C), in x's dtype."""
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation OpenAI CLIP was trained with (clip/model.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * sigmoid(1.702 x), elementwise: any shape -> the same shape."""
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with nn.MultiheadAttention's parameter names
    (`in_proj_weight` = rows [q; k; v], `out_proj`), computed by `minisd.attention`."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal self-attention: (B, L, width) -> (B, L, width)."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, width)
        # Token i sees tokens 0..i only: the causal mask of CLIP's text encoder, built by SDPA.
        return self.out_proj(attention(q, k, v, heads=self.heads, is_causal=True))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block (open_clip `ResidualAttentionBlock`, names included)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config.width, config.heads)
        self.ln_2 = LayerNorm(config.width, eps=config.layer_norm_eps)
        act = QuickGELU() if config.act == "quick_gelu" else nn.GELU()  # nn.GELU: exact erf form
        # Sequential with open_clip's names; "gelu" holds whichever activation the config says.
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(config.width, config.mlp_width)), ("gelu", act),
                 ("c_proj", nn.Linear(config.mlp_width, config.width))]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm attention and MLP, each residual: (B, L, width) -> (B, L, width)."""
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """The stack of blocks; a module of its own only so keys read `transformer.resblocks.N` (open_clip)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(config) for _ in range(config.layers)])


@dataclass(frozen=True)
class TextOutput:
    """What `TextTransformer.forward` returns.

    hidden_states: `layers + 1` tensors `(B, L, width)` (HF's convention): the embeddings, then the
        output of each block; after an early stop, only the blocks that ran.
    last_hidden_state: `ln_final(hidden_states[-1])`, `(B, L, width)`; None after an early stop.
    pooled: `last_hidden_state` at each row's EOT token, times `text_projection` when the config
        has one: `(B, projection_dim)` or `(B, width)`; None after an early stop.
    """

    hidden_states: tuple[torch.Tensor, ...]
    last_hidden_state: torch.Tensor | None
    pooled: torch.Tensor | None


class TextTransformer(nn.Module):
    """The causal text transformer of CLIP, named like open_clip's `TextTransformer`.

    Parameters are left uninitialised (`torch.empty`): build it on the meta device and
    load a checkpoint with `keymap.load_strict`, which assigns the tensors."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        # `_weight` skips nn.Embedding's normal_ init, which on the meta device costs a 1.3 s
        # import of torch._dynamo; the weights come from the checkpoint anyway.
        self.token_embedding = nn.Embedding(
            config.vocab_size, config.width, _weight=torch.empty(config.vocab_size, config.width)
        )
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(config)
        self.ln_final = LayerNorm(config.width, eps=config.layer_norm_eps)
        # A raw matrix used as `x @ P` (open_clip, OpenAI CLIP); HF stores its transpose as nn.Linear.
        self.text_projection = None
        if config.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))

    def forward(
        self,
        input_ids: torch.Tensor,
        eot_index: torch.Tensor | None = None,
        *,
        num_layers: int | None = None,
        token_embeds: torch.Tensor | None = None,
    ) -> TextOutput:
        """Encode token ids `(B, L)`, `L <= context_length` (shorter inputs use the first `L` positions).

        eot_index: `(B,)` position to pool at; by default each row's first EOT (`config.eot_token_id`,
            49407). open_clip takes `argmax(input_ids)` and HF the first EOS: the same, as EOT is the
            largest id and argmax returns the first maximum.
        num_layers: run only the first `num_layers` blocks (SD2 and SDXL's CLIP-L use only the
            penultimate output; bigG needs `pooled` too, so runs all); when fewer than
            `config.layers` blocks run, `last_hidden_state` and `pooled` are None.
        token_embeds: `(B, L, width)` token embeddings to use instead of `token_embedding(input_ids)`
            (textual inversion puts learned vectors at some positions); `input_ids` still give the
            pooling position.
        """
        cfg = self.config
        self._check_ids(input_ids)
        n = cfg.layers if num_layers is None else num_layers
        if not 0 <= n <= cfg.layers:
            raise ValueError(f"num_layers must be in [0, {cfg.layers}], got {num_layers}")

        if token_embeds is None:
            token_embeds = self.token_embedding(input_ids)
        elif token_embeds.shape != (*input_ids.shape, cfg.width):
            raise ValueError(f"token_embeds must be {(*input_ids.shape, cfg.width)}, got {tuple(token_embeds.shape)}")
        eot = None
        if n == cfg.layers:
            eot = self._eot_index(input_ids) if eot_index is None else self._check_eot(eot_index, input_ids)
        return TextOutput(*self._encode(token_embeds, eot, n))

    def _encode(
        self, token_embeds: torch.Tensor, eot: torch.Tensor | None, n: int
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None]:
        """The computation of `forward` on checked inputs (no data-dependent branch, so
        `minisd.speed.compile_module` compiles it whole): (hidden_states, last, pooled)."""
        # Token plus learned absolute position embeddings, (B, L, width).
        x = token_embeds + self.positional_embedding[: token_embeds.shape[1]]
        hidden_states = [x]
        for block in self.transformer.resblocks[:n]:
            x = block(x)
            hidden_states.append(x)
        if eot is None:
            return tuple(hidden_states), None, None

        # Final LayerNorm, then the sequence is summarised by the EOT token's state (CLIP sec. 2.4).
        last = self.ln_final(x)
        pooled = last[torch.arange(last.shape[0], device=last.device), eot]  # (B, width)
        if self.text_projection is not None:
            pooled = pooled @ self.text_projection  # (B, projection_dim)
        return tuple(hidden_states), last, pooled

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        cfg, shape = self.config, tuple(input_ids.shape)
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must be integer (batch, tokens), got {input_ids.dtype} {shape}")
        if shape[1] > cfg.context_length:
            raise ValueError(f"input_ids has {shape[1]} tokens, more than context_length {cfg.context_length}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            lo, hi = int(input_ids.min()), int(input_ids.max())
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]")

    def _eot_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        eot = self.config.eot_token_id
        is_eot = input_ids == eot
        if not bool(is_eot.any(dim=1).all()):
            raise ValueError(f"every row of input_ids needs an EOT token ({eot}), or pass eot_index")
        return is_eot.int().argmax(dim=1)  # first occurrence

    @staticmethod
    def _check_eot(eot_index: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        b, length = input_ids.shape
        if eot_index.shape != (b,) or eot_index.is_floating_point():
            raise ValueError(f"eot_index must be integer ({b},), got {eot_index.dtype} {tuple(eot_index.shape)}")
        if b and (eot_index.min() < 0 or eot_index.max() >= length):
            raise ValueError(f"eot_index must lie in [0, {length}), got {eot_index.tolist()}")
        return eot_index.to(device=input_ids.device, dtype=torch.long)
