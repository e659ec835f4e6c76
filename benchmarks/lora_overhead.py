"""What an applied LoRA costs per U-Net call: unfused (hooks) vs fused vs no LoRA.

    python benchmarks/lora_overhead.py                        # a mid-size U-Net (fast on a CPU)
    python benchmarks/lora_overhead.py --full --size 64       # SD1's U-Net (860M), 512x512 latents
    python benchmarks/lora_overhead.py --device cuda --dtype fp16 --full --rank 64

The LoRA covers what kohya's LoCon trainer covers: every Linear / 1x1 projection of the
transformers (q, k, v, out, ff, proj_in/out) and every 3x3 conv of the ResBlocks, at `--rank`,
random weights, written as a kohya file (`lora_unet_<module>` names) and loaded with
`StableDiffusion.load_lora`. Three timings of one denoising call on the same inputs, each the
median of `--repeats` after `--warmup` calls, under `torch.inference_mode()`:

- none:    the plain U-Net;
- unfused: forward hooks add s * up(down(x)) to each changed layer's output (r x (in + out) extra
           multiply-adds per position and layer, plus one extra kernel launch pair per layer);
- fused:   W + delta written into the weights once (no per-call cost; the fuse itself is timed apart).

The printed ratios are what to expect from each mode; no test asserts on them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minisd.families import FAMILIES
from minisd.model import StableDiffusion
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import SD1_UNET, UNetConfig, UNetModel
from minisd.vae import AutoencoderKL, VAEConfig

MID_UNET = UNetConfig(model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1, 2, 4),
                      num_heads=4, context_dim=768)  # fmt: skip
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def model(config: UNetConfig, device: str, dtype: torch.dtype) -> StableDiffusion:
    """A StableDiffusion around a random U-Net (the text encoder is not timed: a stand-in, never run)."""
    torch.manual_seed(0)
    unet = UNetModel(config).to(device=device, dtype=dtype).eval()
    for p in unet.parameters():
        nn.init.normal_(p, std=0.02)
    family = FAMILIES["sd1"]
    with torch.device("meta"):
        vae, text = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1,), num_res_blocks=1)), []
    return StableDiffusion(family=family, unet=unet, vae=vae, text_encoders=text, text_uses=[],
                           tokenizer=CLIPTokenizer())  # fmt: skip


def lora_file(unet: UNetModel, rank: int, path: Path) -> int:
    """A kohya LoCon file over the transformer projections and the ResBlocks' 3x3 convs."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, m in unet.named_modules():
        is_transformer_linear = ".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))
        in_resblock = "in_layers" in name or "out_layers" in name
        is_res_conv = isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and in_resblock
        if not (isinstance(m, (nn.Linear, nn.Conv2d)) and (is_transformer_linear or is_res_conv)):
            continue
        layer = "lora_unet_" + name.replace(".", "_")
        w = m.weight
        down_shape = (rank, w.shape[1], *w.shape[2:])
        up_shape = (w.shape[0], rank, *((1, 1) if w.dim() == 4 else ()))
        state[f"{layer}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.02
        state[f"{layer}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.02
        state[f"{layer}.alpha"] = torch.tensor(float(rank))
    save_file(state, path)
    return len(state) // 3


def timed(fn, warmup: int, repeats: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD1's full U-Net instead of a mid-size one")
    parser.add_argument("--size", type=int, default=32, help="latent side")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    dtype = DTYPES[args.dtype]
    sd = model(SD1_UNET if args.full else MID_UNET, args.device, dtype)
    cfg = sd.unet.config
    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size, device=args.device, dtype=dtype)
    t = torch.full((args.batch,), 500.0, device=args.device)
    ctx = torch.randn(args.batch, 77, cfg.context_dim, device=args.device, dtype=dtype)

    def step() -> None:
        with torch.inference_mode():
            sd.unet(x, t, ctx)

    results = {"none": timed(step, args.warmup, args.repeats, args.device)}
    with tempfile.TemporaryDirectory() as tmp:
        n = lora_file(sd.unet, args.rank, Path(tmp) / "locon.safetensors")
        sd.load_lora(Path(tmp) / "locon.safetensors", scale=0.8)
    results["unfused"] = timed(step, args.warmup, args.repeats, args.device)
    start = time.perf_counter()
    sd.fuse_lora()
    fuse_s = time.perf_counter() - start
    results["fused"] = timed(step, args.warmup, args.repeats, args.device)
    params = sum(p.numel() for p in sd.unet.parameters()) / 1e6
    print(f"U-Net {params:.0f}M params, {n} LoRA layers at rank {args.rank}, batch {args.batch}, "
          f"{args.size}x{args.size} latents, {args.device} {args.dtype}")  # fmt: skip
    for mode, seconds in results.items():
        print(f"  {mode:8s} {seconds * 1e3:9.1f} ms   x{seconds / results['none']:.3f} of no LoRA")
    print(f"  fusing once took {fuse_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
