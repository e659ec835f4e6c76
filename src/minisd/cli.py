"""The `minisd` command line.

minisd info CHECKPOINT|IMG.png        what a file or folder holds, and why we think so; an image's parameters
minisd generate PROMPT -o out.png [--model CHECKPOINT] [--steps 50 --sampler euler --seed 0 ...]
                                       (no --model: minisd.TINY, the built-in model trained on shapes);
                                       img2img, inpainting, refiner, hires fix, --from-png, --prompts (cli_generate)
minisd samplers                        the samplers and schedules, with their diffusers and A1111 names
minisd convert SRC DST [--format official|diffusers] [--allow-pickle] [--dtype fp16]
minisd eval-shapes [--model CHECKPOINT] [--n 16]   accuracy per attribute on shapes prompts (minisd.shapes)
minisd demo [-o demo.png]              the whole path on a tiny random model (no weights needed)
minisd train DATA -o OUT (--model CKPT | --new FAMILY) [--steps N --batch-size B ...]   (minisd.train)

Files: every destination is checked before any work (its folder exists and is writable, it is
not a folder, it does not exist unless --overwrite; with --num-images, every name), and every
file is written atomically (`files.atomic_write`), so an existing image or checkpoint is never
lost to a full disk or an interruption.

Errors: a usage error (a bad option) is argparse's usage and one line, exit status 2. A runtime error
(a missing, unreadable, corrupt or misnamed file, a bad value) is one `minisd: error: ...` line and exit
status 1; --debug adds the traceback (--verbose only turns on logging). Ctrl-C exits 130, SIGTERM 143,
with no traceback and no partial file.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import signal
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from typing import NoReturn

import PIL.Image
import torch
from safetensors import SafetensorError

from .checkpoint import apply_config, save
from .cli_generate import add_generate, image_format
from .cli_generate import positive_int as _positive_int
from .detection import (
    KNOWN_SHA256,
    DetectedModel,
    detect,
    read_safetensors_header,
    sha256,
)
from .explain import add_parser as _add_explain
from .families import UNET_PREFIX, VAE_PREFIX, family_spec
from .files import atomic_write, check_destination, check_source
from .keymap import CheckpointError
from .layouts import ignore_reason, official_tables
from .metadata import JSON_KEY, PARAMETERS_KEY, read_text
from .model import DEFAULT_STEPS, load
from .parity import add_parser as _add_parity
from .samplers import SAMPLER_NAMES, SAMPLERS, SIGMA_SCHEDULES, sampler_parts
from .train import main as train_main

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# What a user can cause: files and arguments (CheckpointError, json and Unicode errors are
# ValueErrors; PermissionError, IsADirectoryError, FileExistsError ... are OSErrors). Anything
# else is a bug in minisd, and keeps its traceback.
USER_ERRORS = (CheckpointError, ValueError, OSError, SafetensorError, pickle.UnpicklingError)


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
            named = f"  = official {known.name}" if known else "  (not a known official file)"
            lines.append(f"  sha256:      {digest}{named}")
            # A1111 shows (and writes into images' infotext) the first 10 hex digits as the "model hash"
            lines.append(f"  short hash:  {digest[:10]}  (A1111's model hash)")
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def describe_image(path: Path) -> str:
    """The `minisd info` report of an image: its A1111 parameters and minisd's JSON copy, if present."""
    text = read_text(path)
    if PARAMETERS_KEY not in text and JSON_KEY not in text:
        return f"{path}\n  no generation parameters (no A1111 'parameters' or 'minisd' chunk)"
    lines = [f"{path}"]
    if PARAMETERS_KEY in text:
        lines += ["parameters (A1111):"] + ["  " + line for line in text[PARAMETERS_KEY].splitlines()]
    if JSON_KEY in text:
        settings = json.loads(text[JSON_KEY])
        lines += ["minisd:"] + [f"  {k}: {v!r}" for k, v in sorted(settings.items()) if v not in (None, (), [])]
    return "\n".join(lines)


def _cmd_info(args) -> int:
    path = check_source(args.checkpoint)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        print(describe_image(path))
    else:
        print(describe(path, with_hash=not args.no_hash))
    return 0


def samplers_table() -> str:
    """`minisd samplers`: every sampler name, its description, and its diffusers and A1111 equivalents."""
    lines = [f"{'name':<22} {'A1111 (Sampler, Schedule type)':<32} diffusers"]
    for name in SAMPLER_NAMES:
        base, kind = sampler_parts(name)
        spec, (option, a1111_kind, _) = SAMPLERS[base], SIGMA_SCHEDULES[kind]
        scheduler = spec.diffusers if kind == "discrete" else f"{spec.diffusers} + {option}"
        lines.append(f"{name:<22} {spec.a1111 + ', ' + a1111_kind:<32} {scheduler}")
        if kind == "discrete":
            lines.append(f"{'':<22} {spec.about}")
    lines += ["", "schedules (a suffix of the name: euler_karras):"]
    lines += [f"  {kind:<12} {about} (A1111 {a1111}, diffusers {option})"
              for kind, (option, a1111, about) in SIGMA_SCHEDULES.items()]  # fmt: skip
    return "\n".join(lines)


def _cmd_samplers(args) -> int:
    print(samplers_table())
    return 0


def _write_image(image: PIL.Image.Image, path: Path, fmt: str, *, overwrite: bool) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt), overwrite=overwrite)


def _model_and_size(model: str | None, width: int | None, height: int | None) -> tuple[Path, tuple]:
    """The checkpoint to load (checked) and the (height, width) asked: with no --model, the built-in
    `minisd.TINY` at the size it was trained at (its file records it too, as `default_size`; `eval-shapes`
    needs the number itself), on one thread."""
    if model is not None:
        return check_source(model), (height, width)
    from . import TINY
    from .shapes import SIZE

    # Its tensors are too small to split across threads: on a busy 2-core machine OpenMP's barriers
    # made one picture take 78 s on 2 threads against 0.7 s on 1 (measured; tests/conftest.py saw ~40x).
    torch.set_num_threads(1)
    return check_source(TINY), (height or SIZE, width or SIZE)


def _cmd_eval_shapes(args) -> int:
    from .shapes import evaluate

    model, (size, _) = _model_and_size(args.model, args.size, args.size)
    sd = load(model, device=args.device)
    ev = evaluate(sd, args.n, seed=args.seed, size=size, steps=args.steps, guidance_scale=args.guidance)
    print(f"{model}: {args.n} prompts per form, size {size}, steps {args.steps or DEFAULT_STEPS}, "
          f"guidance {args.guidance if args.guidance is not None else sd.family.default_guidance}")
    print(ev.table())
    return 0


def _cmd_convert(args) -> int:
    dst = check_destination(args.dst, overwrite=args.overwrite, folder=args.format == "diffusers")
    if args.format == "official" and dst.suffix != ".safetensors":  # as `save` checks, but before loading
        raise ValueError(f"{dst}: an official single file must end in .safetensors")
    check_source(args.src)
    if args.config:
        check_source(args.config)
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
    out = check_destination(args.output, overwrite=args.overwrite)
    fmt = image_format(out)
    with tempfile.TemporaryDirectory() as tmp:
        path = demo_model(Path(tmp))
        print(describe(path, with_hash=False))
        sd = load(path, config=path.with_suffix(".json"))
        image = sd.generate("a photograph of an astronaut riding a horse", steps=4, width=64, height=64, seed=0)[0]
    _write_image(image, out, fmt, overwrite=args.overwrite)
    print(
        f"wrote {out} ({image.size[0]}x{image.size[1]}): random weights, so the image is noise; "
        "pass a real checkpoint to `minisd generate` for a picture"
    )
    return 0


# ------------------------------------------------------------------------------ the parser
def _device(text: str) -> torch.device:
    """A torch device that exists here ("cpu", "cuda", "cuda:1", "mps")."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (try cpu, cuda, cuda:1 or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch has no MPS device")
    return device


def _model_args(q: argparse.ArgumentParser, dtype_default: str | None) -> None:
    """The options of every command that loads a model."""
    q.add_argument("--family", help="override detection (sd1, sd2, sd2-v, sdxl, ...)")
    q.add_argument("--config", help="JSON file of a non-standard architecture")
    q.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=dtype_default,
        help="U-Net and text encoders (default: " + (dtype_default or "fp16 on CUDA, else fp32") + ")",
    )


def _add_info(sub) -> None:
    info = sub.add_parser("info", help="what a checkpoint holds (header and hash), or an image's parameters",
                          epilog="examples:\n  minisd info v1-5-pruned-emaonly.safetensors\n  minisd info out.png",
                          formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    info.add_argument("checkpoint", help="a checkpoint file, a diffusers folder, or a PNG minisd or A1111 wrote")
    info.add_argument("--no-hash", action="store_true", help="skip the SHA-256 (it reads the whole file)")
    info.set_defaults(func=_cmd_info)


def _add_generate(sub) -> None:
    add_generate(sub, _model_args, _device)


def _add_samplers(sub) -> None:
    samplers = sub.add_parser("samplers", help="list the samplers and schedules (diffusers and A1111 names)")
    samplers.set_defaults(func=_cmd_samplers)


def _add_eval_shapes(sub) -> None:
    ev = sub.add_parser("eval-shapes", help="generate shapes prompts and judge them (minisd.shapes.evaluate)")
    ev.add_argument("--model", help="checkpoint (default: minisd.TINY)")
    ev.add_argument("--n", type=_positive_int, default=16, help="prompts per form, training and held-out pairs")
    ev.add_argument("--size", type=_positive_int, help="picture side (default: 32, the shapes' size, with no --model)")
    ev.add_argument("--steps", type=_positive_int, help="sampler steps (default: the library's)")
    ev.add_argument("--guidance", type=float, help="guidance scale (default: the family's)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", type=_device, default="cpu")
    ev.set_defaults(func=_cmd_eval_shapes)


def _add_convert(sub) -> None:
    conv = sub.add_parser("convert", help="official single file <-> diffusers folder, .ckpt -> .safetensors")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--format", choices=["official", "diffusers"], default="official")
    conv.add_argument("--allow-pickle", action="store_true", help="read a trusted .ckpt (torch.load weights_only)")
    conv.add_argument("--use-ema", action="store_true")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing file, or write into a folder")
    _model_args(conv, "fp32")
    conv.set_defaults(func=_cmd_convert)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="run the whole pipeline on a tiny random model (no weights needed)")
    demo.add_argument("-o", "--output", default="minisd-demo.png")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(func=_cmd_demo)


def _cmd_train(args) -> int:
    return train_main(args.args + (["--verbose"] if args.verbose else []))


def _add_train(sub) -> None:
    # Everything after `train` goes to `minisd.train.main`, which has its own parser and --help;
    # prefix_chars="+" keeps this parser from reading (and refusing) those options.
    train = sub.add_parser("train", help="train or fine-tune a model (see `minisd train --help`)", add_help=False,
                           prefix_chars="+")  # fmt: skip
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(func=_cmd_train)


# one function per subcommand: a new command is a new `_add_*` here and its `_cmd_*`
COMMANDS = (
    _add_info, _add_generate, _add_samplers, _add_explain, _add_parity, _add_eval_shapes, _add_convert, _add_demo,
    _add_train,
)


def _common(p: argparse.ArgumentParser, default) -> None:
    """-v/--verbose and --debug, on the main parser and (without defaults, so either place works) each command."""
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress and decisions")
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (exit status 2): `minisd generate: error: ... (see --help)`."""

    def error(self, message: str) -> NoReturn:
        """Print the usage, one error line and a pointer to --help, then exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `minisd` argument parser, with every subcommand and the common options."""
    p = Parser(prog="minisd", description="Stable Diffusion v1/v2/XL from scratch")
    _common(p, False)
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for name, command in sub.choices.items():
        if name != "train":  # train parses its own options
            _common(command, argparse.SUPPRESS)
    return p


def error_message(e: BaseException) -> str:
    """A user error as one message: an OSError as "path: reason" rather than "[Errno 13] ...: 'path'"."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return e.strerror if where is None else f"{where}: {e.strerror}"
    return str(e) or type(e).__name__


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that `finally` blocks (temporary files) run as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run the `minisd` command line on `argv` (sys.argv[1:] when None); returns the exit status.

        minisd.cli.main(["generate", "a red circle", "-o", "out.png"])  # the tiny model
    """
    args = build_parser().parse_args(argv)  # a bad argument: usage, one error line, exit 2 (argparse)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return args.func(args)
    except KeyboardInterrupt:  # files being written are cleaned up by `files.atomic_write`
        print("minisd: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("minisd: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - every error is one line; --debug shows where it came from
        if args.debug:
            traceback.print_exc()
        known = isinstance(e, USER_ERRORS)
        message = error_message(e) if known else f"internal error, {type(e).__name__}: {e} (--debug shows where)"
        print(f"minisd: error: {message}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
