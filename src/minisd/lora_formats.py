"""The names LoRA and LyCORIS files give the layers they change, as a table generated from the model config.

A LoRA file stores, per changed layer, a few small tensors under `<layer name>.<role>`:

    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight      kohya / A1111 (SD1, SD2)
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha    kohya SDXL (sgm module names)
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight kohya text encoder (SD1/SD2)
    lora_te1_... / lora_te2_...                                          kohya SDXL: CLIP-L / bigG
    unet.down_blocks.0.attentions.0.proj_in.lora_A.weight               diffusers / PEFT
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight
    text_encoder_2.... ; unet.....to_q.lora.down.weight                  (older diffusers spelling)
    lora_unet_..._conv1.hada_w1_a / .lokr_w1 / ...                       LyCORIS LoHa / LoKr

The layer names are module names of some implementation with '.' turned into '_' (kohya):
diffusers' `UNet2DConditionModel` for SD1/SD2 LoRAs, sgm's own U-Net (= minisd's names) for
SDXL ones (kohya's `sdxl_original_unet.py` keeps sgm's names), and transformers' `CLIPTextModel`
for every text encoder (kohya converts OpenCLIP to it). `lora_table` lists every name each
format can give each Linear / Conv2d weight of a loaded model, all generated from the model's
configs through the existing key tables (`diffusers_format.unet_table`, `layouts.hf_table`):
no pattern guessing. A name the table does not hold is an unknown key.

minisd's OpenCLIP-style text towers keep q, k and v fused in `attn.in_proj_weight` (rows
[q; k; v], the `concat0` rule of `layouts.hf_table`): a LoRA on `q_proj` changes rows
`0:width` of it, which a `LoraTarget` says with `rows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .clip import TextConfig
from .detection import what_else
from .diffusers_format import unet_table
from .layouts import hf_table
from .unet import UNetConfig, UNetModel

UNET = "unet"  # `LoraTarget.component` of the U-Net; text encoders are their index (0, 1)


@dataclass(frozen=True)
class LoraTarget:
    """One weight a LoRA layer changes: `component` ("unet" or a text-encoder index), the module
    that owns it, the parameter's name there, and the rows of it (start, stop) or None for all."""

    component: str | int
    module: str
    param: str = "weight"
    rows: tuple[int, int] | None = None

    def describe(self) -> str:
        """A readable name of the target, e.g. `U-Net <module>.<param>[0:320]`."""
        where = "U-Net" if self.component == UNET else f"text encoder {self.component}"
        rows = "" if self.rows is None else f"[{self.rows[0]}:{self.rows[1]}]"
        return f"{where} {self.module}.{self.param}{rows}"


# The tensor roles a file may hold for one layer: suffix -> (method, part). The method says how
# the parts make the weight change (`lora.delta_weight`); "alpha" is the scale numerator of all.
ROLES: dict[str, tuple[str | None, str]] = {
    # kohya / A1111 (networks/lora.py: lora_down, lora_up; LoCon's CP core lora_mid)
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    # PEFT (diffusers' current format): A is the down projection, B the up projection
    "lora_A.weight": ("lora", "down"),
    "lora_B.weight": ("lora", "up"),
    # diffusers' pre-PEFT LoRALinearLayer spelling
    "lora.down.weight": ("lora", "down"),
    "lora.up.weight": ("lora", "up"),
    # LyCORIS LoHa (Hyeon-Woo et al. 2022, FedPara): two Hadamard-multiplied low-rank products
    "hada_w1_a": ("hada", "w1a"),
    "hada_w1_b": ("hada", "w1b"),
    "hada_w2_a": ("hada", "w2a"),
    "hada_w2_b": ("hada", "w2b"),
    "hada_t1": ("hada", "t1"),
    "hada_t2": ("hada", "t2"),
    # LyCORIS LoKr: a Kronecker product, each factor whole or as a low-rank product
    "lokr_w1": ("lokr", "w1"),
    "lokr_w1_a": ("lokr", "w1a"),
    "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"),
    "lokr_w2_a": ("lokr", "w2a"),
    "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    "alpha": (None, "alpha"),
}
# Longest first, so "lora.down.weight" is not read as "<layer>.lora" + "down.weight".
_SUFFIXES = sorted(ROLES, key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """`<layer>.<role>` -> (layer, role), or None when the key ends in no known role."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _add(table: dict[str, LoraTarget], name: str, target: LoraTarget) -> None:
    """One name -> one target; the '.'->'_' names of two modules must never meet."""
    if table.setdefault(name, target) != target:
        raise RuntimeError(f"lora_table: {name!r} names both {table[name].describe()} and {target.describe()}")


def unet_names(config: UNetConfig) -> dict[str, LoraTarget]:
    """Every name of every Linear / Conv2d weight of the U-Net: sgm's (ours) and diffusers' module
    names, each as kohya spells it (`lora_unet_` + '_'-joined) and as diffusers/PEFT do (`unet.` + name)."""
    diffusers_name = {r.ours: r.theirs[0] for r in unet_table(config).rules}  # tensor names, ours -> theirs
    with torch.device("meta"):
        model = UNetModel(config)
    table: dict[str, LoraTarget] = {}
    for module, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        target = LoraTarget(UNET, module)
        theirs = diffusers_name[f"{module}.weight"].removesuffix(".weight")
        for name in (module, theirs):
            _add(table, "lora_unet_" + _underscored(name), target)
        _add(table, "unet." + theirs, target)
    return table


def text_names(config: TextConfig, index: int, kohya_prefix: str, diffusers_prefix: str) -> dict[str, LoraTarget]:
    """Every name of every Linear weight of text encoder `index` (and the q/k/v rows of its fused
    `in_proj_weight`), in transformers' CLIPTextModel names: kohya's (`lora_te_` + '_'-joined) and
    diffusers' (`text_encoder.` + name, with or without transformers' `text_model.` level)."""
    table: dict[str, LoraTarget] = {}
    for rule in hf_table(config).rules:
        if not rule.ours.endswith("weight") or rule.transform not in ("identity", "concat0"):
            continue  # biases, embeddings, the transposed text_projection: no LoRA targets them
        module, _, param = rule.ours.rpartition(".")
        if rule.transform == "identity" and not module.startswith("transformer."):
            continue  # token embedding, positional embedding, final LayerNorm
        if module.endswith(("ln_1", "ln_2")):
            continue
        for i, theirs in enumerate(rule.theirs):
            rows = (i * config.width, (i + 1) * config.width) if rule.transform == "concat0" else None
            target = LoraTarget(index, module, param, rows)
            layer = theirs.removesuffix(".weight")  # text_model.encoder.layers.0.self_attn.q_proj
            _add(table, kohya_prefix + _underscored(layer), target)
            _add(table, diffusers_prefix + layer, target)
            _add(table, diffusers_prefix + layer.removeprefix("text_model."), target)  # transformers >= 5.6
    return table


def lora_table(unet: UNetConfig, text: Sequence[tuple[TextConfig, str]]) -> dict[str, LoraTarget]:
    """Foreign layer name -> `LoraTarget`, for a model with this U-Net and these text encoders
    (config, diffusers folder name: "text_encoder" / "text_encoder_2"), in official order.

    kohya calls one text encoder `lora_te_` and SDXL's two `lora_te1_` (CLIP-L) / `lora_te2_` (bigG)."""
    table = dict(unet_names(unet))
    for i, (config, folder) in enumerate(text):
        kohya = "lora_te_" if len(text) == 1 else f"lora_te{i + 1}_"
        for name, target in text_names(config, i, kohya, folder + ".").items():
            _add(table, name, target)
    return table


# ------------------------------------------------------------------------ what a file is made for
# The cross-attention context width of each family's U-Net, and the width of each text tower:
# what an attn2.to_k LoRA (its down projection's input) and a q_proj LoRA reveal about its model.
_CONTEXT_WIDTHS = {768: "SD1", 1024: "SD2", 2048: "SDXL", 1280: "SDXL refiner"}
_KOHYA_TEXT_PREFIXES = {"lora_te_": 1, "lora_te1_": 2, "lora_te2_": 2, "text_encoder_2.": 2}


@dataclass(frozen=True)
class MadeFor:
    """What a LoRA file's names and shapes say about the model it was trained on."""

    text_encoders: int | None  # 1 (lora_te_) or 2 (lora_te1_/lora_te2_), None when it has no text part
    context_width: int | None  # in-width of a cross-attention to_k / to_v, None when absent

    def describe(self) -> str:
        """The model family evidence in words (context width, text encoders), or 'no evidence'."""
        parts = []
        if self.context_width is not None:
            family = _CONTEXT_WIDTHS.get(self.context_width, "an unknown family")
            parts.append(f"{family}: cross-attention context width {self.context_width}")
        if self.text_encoders is not None:
            parts.append(f"{self.text_encoders} text encoder(s)")
        return "; ".join(parts) or "no evidence"


def made_for(layers: Mapping[str, Mapping[str, torch.Tensor]]) -> MadeFor:
    """Read `MadeFor` off a file's layers ({layer name: {role: tensor}})."""
    encoders, width = None, None
    for layer, parts in layers.items():
        for prefix, n in _KOHYA_TEXT_PREFIXES.items():
            if layer.startswith(prefix):
                encoders = max(encoders or 0, n)
        if _underscored(layer).endswith(("attn2_to_k", "attn2_to_v")) and width is None:
            down = parts.get("lora_down.weight", parts.get("lora_A.weight", parts.get("lora.down.weight")))
            if down is not None and down.dim() >= 2:
                width = int(down.shape[1])
    return MadeFor(encoders, width)


def model_made_for(unet: UNetConfig, text_encoders: int) -> MadeFor:
    """The same description for a loaded model, to compare with a file's."""
    return MadeFor(text_encoders, unet.context_dim)


# ------------------------------------------------------------------------ files that are not LoRAs
def what_it_is(keys: Sequence[str]) -> str:
    """A sentence saying what a file that holds no LoRA layer looks like (`detection.WHAT_ELSE`)."""
    shown = ", ".join(sorted(keys)[:6]) or "no tensors"
    otherwise = f"it holds no LoRA layer (expected keys ending in one of {list(ROLES)[:6]}...); its keys: {shown}"
    return what_else(keys, asked="lora", otherwise=otherwise)
