"""The `minisd` command line.

minisd info CHECKPOINT                 what a file or folder holds, and why we think so
minisd generate CHECKPOINT PROMPT -o out.png [--steps 50 --sampler euler --seed 0 ...]
minisd convert SRC DST [--format official|diffusers] [--allow-pickle] [--dtype fp16]
minisd demo [-o demo.png]              the whole path on a tiny random model (no weights needed)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from .checkpoint import apply_config, save
from .detection import (
    KNOWN_SHA256,
    DetectedModel,
    detect,
    read_safetensors_header,
    sha256,
)
from .families import UNET_PREFIX, VAE_PREFIX, family_spec
from .keymap import CheckpointError
from .layouts import ignore_reason, official_tables
from .model import DEFAULT_STEPS, load

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def describe(path: Path, *, with_hash: bool = True) -> str:
    """The `minisd info` report: family, evidence, parameters per component, dtypes, ignored keys."""
    d: DetectedModel = detect(path)
    lines = [
        f"{path}",
        f"  format:      {d.format}",
        f"  family:      {d.family.name}",
        f"  prediction:  {d.prediction_type or 'undecided from the header (load decides)'} - {d.prediction_reason}",
    ]
    lines += ["  evidence:"] + [f"    - {e}" for e in d.evidence]
    if d.format == "single-file":
        header = read_safetensors_header(path)
        tensors = header.tensors
        family = d.family
        parts = [("U-Net", UNET_PREFIX), ("VAE", VAE_PREFIX)]
        parts += [(f"text encoder {i} ({t.layout})", t.official_prefix) for i, t in enumerate(family.text)]
        parts.append(("EMA copy of the U-Net", "model_ema."))
        lines.append("  parameters:")
        for name, prefix in parts:
            count = sum(_numel(t.shape) for k, t in tensors.items() if k.startswith(prefix))
            if count:
                lines.append(f"    {name:<26} {count / 1e6:10.2f}M")
        lines.append("  dtypes:      " + ", ".join(f"{k} x{v}" for k, v in sorted(d.dtypes.items())))
        tables = official_tables(family, set(tensors))
        used = {k for t in tables.values() for k in t.theirs_keys}
        missing = used - set(tensors)
        reasons = Counter(ignore_reason(k, tables) for k in tensors if k not in used)
        unexpected = reasons.pop(None, 0)
        if missing or unexpected:
            lines.append(
                f"  architecture: differs from the official {family.name} preset ({len(missing)} keys missing, "
                f"{unexpected} unexpected): load it with config=..."
            )
        else:
            lines.append(f"  architecture: the official {family.name} preset, key for key")
        if reasons:
            lines.append("  ignored when loading:")
            lines += [f"    {n:5d} key(s): {r}" for r, n in reasons.most_common()]
        if header.metadata:
            lines.append("  metadata:    " + ", ".join(f"{k}={v[:40]}" for k, v in sorted(header.metadata.items())))
        if with_hash:
            digest = sha256(path)
            known = KNOWN_SHA256.get(digest)
            lines.append(
                f"  sha256:      {digest}" + (f"  = official {known[0]}" if known else "  (not a known official file)")
            )
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _cmd_info(args) -> int:
    print(describe(Path(args.checkpoint), with_hash=not args.no_hash))
    return 0


def _cmd_generate(args) -> int:
    # fp16 on a GPU (the VAE stays fp32), fp32 on a CPU, unless --dtype says otherwise
    dtype = _DTYPES[args.dtype] if args.dtype else torch.float16 if args.device.startswith("cuda") else torch.float32
    sd = load(args.checkpoint, device=args.device, dtype=dtype, family=args.family, config=args.config)
    kwargs = dict(
        negative_prompt=args.negative,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        width=args.width,
        height=args.height,
        guidance_scale=args.guidance,
        num_images=args.num_images,
    )
    images = sd.generate(args.prompt, **kwargs)
    out = Path(args.output)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, p in zip(images, paths):
        if p.exists() and not args.overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite to replace it")
        image.save(p)
        print(p)
    return 0


def _cmd_convert(args) -> int:
    sd = load(
        args.src,
        dtype=_DTYPES[args.dtype],
        family=args.family,
        config=args.config,
        allow_pickle=args.allow_pickle,
        use_ema=args.use_ema,
    )
    print(save(sd, args.dst, format=args.format, overwrite=args.overwrite))
    return 0


def demo_model(folder: Path, seed: int = 0) -> Path:
    """A tiny SD1-architecture checkpoint with random weights, in the official layout: lets a
    fresh machine run load -> encode -> sample -> decode -> PNG without downloading anything."""
    from .checkpoint import Components
    from .clip import TextConfig, TextTransformer
    from .unet import UNetConfig, UNetModel
    from .vae import AutoencoderKL, VAEConfig

    config = {
        "unet": UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1, 2),
            num_heads=4,
            context_dim=32,
        ),
        "vae": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
        "text_encoders": [TextConfig(width=32, heads=4, layers=2, mlp_width=64, act="quick_gelu", projection_dim=None)],
    }
    family = apply_config(family_spec("sd1"), config)
    torch.manual_seed(seed)
    unet, vae, encoders = (
        UNetModel(family.unet),
        AutoencoderKL(family.vae),
        [TextTransformer(t.config) for t in family.text],
    )
    with torch.no_grad():
        for module in (unet, vae, *encoders):
            for p in module.parameters():
                p.copy_(
                    torch.randn_like(p) * 0.02
                    if p.dim() > 1
                    else torch.ones_like(p)
                    if p.dim() == 1 and p.shape[0] > 1
                    else p
                )
    model = Components(family, unet, vae, encoders, [t.use() for t in family.text])
    path = folder / "tiny-random-sd1.safetensors"
    save(model, path, overwrite=True)
    (folder / "tiny-random-sd1.json").write_text(
        json.dumps({k: ([c.__dict__ for c in v] if isinstance(v, list) else v.__dict__) for k, v in config.items()})
    )
    return path


def _cmd_demo(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = demo_model(Path(tmp))
        print(describe(path, with_hash=False))
        sd = load(path, config=path.with_suffix(".json"))
        image = sd.generate("a photograph of an astronaut riding a horse", steps=4, width=64, height=64, seed=0)[0]
        out = Path(args.output)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        image.save(out)
        print(
            f"wrote {out} ({image.size[0]}x{image.size[1]}): random weights, so the image is noise; "
            "pass a real checkpoint to `minisd generate` for a picture"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minisd", description="Stable Diffusion v1/v2/XL from scratch")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="what a checkpoint holds (reads the header only, plus a hash)")
    info.add_argument("checkpoint")
    info.add_argument("--no-hash", action="store_true", help="skip the SHA-256 (it reads the whole file)")
    info.set_defaults(func=_cmd_info)

    def model_args(q, dtype_default):
        q.add_argument("--family", help="override detection (sd1, sd2, sd2-v, sdxl, ...)")
        q.add_argument("--config", help="JSON file of a non-standard architecture")
        q.add_argument(
            "--dtype",
            choices=sorted(_DTYPES),
            default=dtype_default,
            help="U-Net and text encoders (default: " + (dtype_default or "fp16 on CUDA, else fp32") + ")",
        )

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("checkpoint")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png")
    gen.add_argument("--negative", default="")
    gen.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS}, as the library)"
    )
    gen.add_argument("--sampler", default="euler")
    gen.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed (default 0, so a command is reproducible; the library draws a fresh seed when given none)",
    )
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--overwrite", action="store_true")
    model_args(gen, None)
    gen.set_defaults(func=_cmd_generate)

    conv = sub.add_parser("convert", help="official single file <-> diffusers folder, .ckpt -> .safetensors")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--format", choices=["official", "diffusers"], default="official")
    conv.add_argument("--allow-pickle", action="store_true", help="read a trusted .ckpt (torch.load weights_only)")
    conv.add_argument("--use-ema", action="store_true")
    conv.add_argument("--overwrite", action="store_true")
    model_args(conv, "fp32")
    conv.set_defaults(func=_cmd_convert)

    demo = sub.add_parser("demo", help="run the whole pipeline on a tiny random model (no weights needed)")
    demo.add_argument("-o", "--output", default="minisd-demo.png")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileExistsError) as e:
        print(f"minisd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
