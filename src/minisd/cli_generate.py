"""`minisd generate`: every pipeline from the shell, one image or a prompt file, with its metadata.

A run is four visible steps, the same for one prompt and for a prompt file:

1. **The request** (`requested`): the settings of `--from-png IMG` (its metadata), overridden by every
   option given on the command line; then the jobs, one per image, each with its seed and its file.
2. **The checks:** every source and destination, before any model is loaded.
3. **The models** (`load_models`): the checkpoint, its adapters (`_apply_adapters`), an SDXL refiner;
   then each job's defaults are resolved against the model (size, guidance, hashes) into a `Generation`.
4. **The batches** (`batch.batches`, this process's share under torchrun), each one `generate` call (or
   `model.base_then_refiner`), each image written with its metadata (`metadata.save_png`).

The library does the work: this file only maps options to `StableDiffusion.generate` arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from . import __version__, batch
from .conditioning import a1111_clip_skip
from .detection import sha256
from .files import atomic_write, check_destination, check_source
from .metadata import Generation, png_info, read_generation
from .model import DEFAULT_STEPS, StableDiffusion, base_then_refiner, load
from .pipeline import HIRES_UPSCALERS
from .progress import Preview, ProgressBar, combine
from .samplers import SAMPLER_NAMES, Callback
from .schedules import SPACINGS

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT_SYNTAXES = ("plain", "a1111", "comfy")

# option dest -> `Generation` field, for the options a request is made of (the rest say where and how to run)
REQUEST_OPTIONS = {
    "prompt": "prompt", "negative": "negative_prompt", "steps": "steps", "sampler": "sampler", "spacing": "spacing",
    "eta": "eta", "guidance": "guidance_scale", "guidance_rescale": "guidance_rescale", "clip_skip": "clip_skip",
    "seed": "seed", "width": "width", "height": "height", "prompt_syntax": "prompt_syntax",
    "init_image": "init_image", "mask": "mask", "strength": "strength", "hires_scale": "hires_scale",
    "hires_strength": "hires_strength", "hires_steps": "hires_steps", "hires_upscale": "hires_upscale",
    "refiner": "refiner", "refiner_at": "refiner_at", "lora": "loras", "embedding": "embeddings", "vae": "vae",
    "model": "model",
}  # fmt: skip
# what a request without --from-png starts from (the rest: `Generation`'s defaults, or the model's)
DEFAULTS = {"steps": DEFAULT_STEPS, "seed": 0, "version": f"minisd {__version__}"}


# ---------------------------------------------------------------------- 1. the request
def requested(args: argparse.Namespace) -> dict:
    """The settings asked for: --from-png's, then every option given (None = not given)."""
    settings = dict(DEFAULTS)
    if args.from_png:
        g = read_generation(check_source(args.from_png))
        if not g.version.startswith("minisd") and args.model is None:  # an A1111 image: its model is not ours
            raise ValueError(f"{args.from_png} was not made by minisd (model {g.model_name or '?'}, hash "
                             f"{g.model_hash or '?'}): pass --model with that checkpoint")  # fmt: skip
        settings.update({k: v for k, v in dataclasses.asdict(g).items() if v is not None})
        settings["version"] = DEFAULTS["version"]
        args.recorded_hash = g.model_hash
        for resolved in ("model_name", "model_hash", "lora_hashes"):  # recomputed from the files used
            settings.pop(resolved, None)
    for dest, name in REQUEST_OPTIONS.items():
        value = getattr(args, dest)
        if value is not None:
            settings[name] = tuple(value) if isinstance(value, list) else value
    return settings


def output_names(out: Path, count: int, overwrite: bool) -> list[Path]:
    """`count` file names for -o OUT: OUT, OUT-1, OUT-2, ... (before the extension), skipping the names
    that exist unless `overwrite`. Each is checked (`files.check_destination`)."""
    names, k = [], 0
    while len(names) < count:
        path = out if k == 0 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        k += 1
        if overwrite or not path.exists():
            names.append(check_destination(path, overwrite=overwrite))
    return names


def image_format(path: Path) -> str:
    """PIL's format name for an output file, from its extension (checked before any work)."""
    fmt = PIL.Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the image format from the extension; use .png, .jpg or .webp")
    return fmt


def plan_jobs(args: argparse.Namespace, settings: dict) -> tuple[list[batch.Job], Path | None]:
    """The jobs and, for a prompt file, the output folder (which gets an index)."""
    if args.prompts:
        if args.output is None:
            raise ValueError("--prompts needs -o FOLDER (the images and index.jsonl go there)")
        entries = batch.read_prompts(args.prompts)
        folder = Path(args.output)
        folder.mkdir(exist_ok=True)  # its parent must exist
        check_destination(folder / batch.INDEX, overwrite=True)
        # --num-images N: N jobs per entry; an entry's own seed s gives s, s + 1, ... (else each job's position)
        expanded = [dict(e, seed=e["seed"] + i) if "seed" in e else e for e in entries for i in range(args.num_images)]
        proto = Generation(**{**settings, "prompt": ""})
        return batch.jobs_for(expanded, proto, folder), folder
    if "prompt" not in settings:
        raise ValueError("no prompt: give PROMPT, --prompts FILE or --from-png IMG.png")
    out = Path(args.output or "out.png")
    names = output_names(out, args.num_images, args.overwrite)
    image_format(out)
    proto = Generation(**settings)
    return [batch.Job(dataclasses.replace(proto, seed=proto.seed + i), p) for i, p in enumerate(names)], None


def check_sources(settings: dict, args: argparse.Namespace) -> None:
    """Check that every input file the request names (model, images, LoRAs, embeddings, configs) is readable."""
    for name in ("model", "init_image", "mask", "refiner", "vae"):
        if settings.get(name):
            check_source(settings[name])
    for spec in settings.get("loras", ()):
        check_source(lora_spec(spec)[0])
    for path in settings.get("embeddings", ()):
        check_source(path)
    for config in (args.config, args.refiner_config):
        if config:
            check_source(config)


def lora_spec(text: str) -> tuple[str, float]:
    """FILE[:SCALE] -> (file, scale); the scale defaults to 1."""
    path, sep, scale = text.rpartition(":")
    if not sep or "/" in scale or not scale.replace(".", "", 1).lstrip("-").isdigit():
        return text, 1.0
    return path, float(scale)


# ---------------------------------------------------------------------- 3. the models
@dataclass
class Models:
    sd: StableDiffusion
    refiner: StableDiffusion | None
    name: str
    short_hash: str | None


def load_models(args: argparse.Namespace, settings: dict) -> Models:
    """The checkpoint (default: minisd.TINY) with its adapters, and the refiner if one is asked for."""
    from . import TINY

    path = Path(settings.get("model") or TINY)
    if settings.get("model") is None:
        # the tiny model's tensors are too small to split across threads (a busy machine made one
        # picture 100x slower on 2 threads than on 1: tests/conftest.py `one_thread`)
        torch.set_num_threads(1)
    dtype = DTYPES[args.dtype] if args.dtype else torch.float16 if args.device.type == "cuda" else torch.float32
    sd = load(path, device=args.device, dtype=dtype, family=args.family, config=args.config)
    args.vae, args.lora, args.embedding = settings.get("vae"), settings.get("loras", ()), settings.get("embeddings", ())
    _apply_adapters(sd, args)
    refiner = None
    if settings.get("refiner"):
        refiner = load(settings["refiner"], device=args.device, dtype=dtype, config=args.refiner_config)
    short = sha256(path)[:10] if path.is_file() else None  # A1111's "Model hash"
    return Models(sd, refiner, path.stem if path.is_file() else path.name, short)


def _apply_adapters(sd: StableDiffusion, args: argparse.Namespace) -> None:
    """--vae, --lora FILE[:SCALE] and --embedding FILE (its token: the file's stem), in that order, through the
    library's calls."""
    if args.vae:
        sd.load_vae(args.vae)
    for spec in args.lora:
        path, scale = lora_spec(spec)
        sd.load_lora(path, scale=scale)
    for path in args.embedding:
        sd.load_embedding(path)


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA short hash: the first 12 hex digits of the SHA-256 of a safetensors file's data, after
    its header (kohya's "addnet hash", A1111 modules/hashes.py `addnet_hash_safetensors`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def resolve(job: batch.Job, models: Models) -> batch.Job:
    """A job with every default the model decides filled in: size, guidance, model name and hashes."""
    g, sd = job.generation, models.sd
    size = sd.family.default_size
    if g.model is None:  # the shipped tiny model was trained at the shapes' size, not its family's
        from .shapes import SIZE as size
    width, height = g.width, g.height
    if g.init_image:
        with PIL.Image.open(g.init_image) as image:
            size_w, size_h = image.size
        width, height = width or size_w, height or size_h
    guidance = sd.family.default_guidance if g.guidance_scale is None else g.guidance_scale
    loras = tuple(f"{Path(lora_spec(s)[0]).stem}: {lora_hash(lora_spec(s)[0])}" for s in g.loras)
    g = dataclasses.replace(g, width=width or size, height=height or size, guidance_scale=guidance,
                            model_name=models.name, model_hash=models.short_hash, lora_hashes=loras)  # fmt: skip
    return batch.Job(g, job.path)


# ---------------------------------------------------------------------- 4. the batches
def generate_kwargs(jobs: list[batch.Job]) -> dict:
    """The `generate` arguments of a batch (its jobs differ only by prompt and seed)."""
    g = jobs[0].generation
    kw = dict(negative_prompt=[j.generation.negative_prompt for j in jobs], steps=g.steps, sampler=g.sampler,
              timestep_spacing=g.spacing, eta=g.eta, guidance_scale=g.guidance_scale,
              guidance_rescale=g.guidance_rescale, clip_skip=a1111_clip_skip(g.clip_skip), width=g.width,
              height=g.height, seed=g.seed, noise="a1111", prompt_syntax=g.prompt_syntax)  # fmt: skip
    if g.init_image:
        kw["init_image"] = PIL.Image.open(g.init_image)
    if g.mask:
        kw["mask_image"] = PIL.Image.open(g.mask)
    if g.strength is not None:
        kw["strength"] = g.strength
    if g.hires_scale is not None:
        kw.update(hires_scale=g.hires_scale, hires_strength=g.hires_strength, hires_steps=g.hires_steps,
                  hires_upscale=g.hires_upscale)  # fmt: skip
    return kw


def run_batch(jobs: list[batch.Job], models: Models, callback) -> list[PIL.Image.Image]:
    """Generate the images of one batch of `jobs` (through the refiner when loaded); one image per job."""
    kw = generate_kwargs(jobs)
    prompts = [j.generation.prompt for j in jobs]
    g = jobs[0].generation
    if models.refiner is not None:
        if g.init_image or g.hires_scale is not None:
            raise ValueError("--refiner runs after text-to-image; it does not combine with --init-image or --hires-*")
        return base_then_refiner(models.sd, models.refiner, prompts, refiner_at=g.refiner_at, callback=callback, **kw)
    return models.sd.generate(prompts, callback=callback, **kw)


def callbacks(
    jobs: list[batch.Job], args: argparse.Namespace, models: Models, label: str
) -> tuple[ProgressBar | None, Callback | None]:
    """The progress bar (on a terminal only) and the previews of a batch."""
    g = jobs[0].generation
    strength = g.strength if g.init_image and g.strength is not None else None
    total = g.steps if strength is None else max(1, min(int(g.steps * strength), g.steps))
    bar = ProgressBar(sys.stderr, label, total) if sys.stderr.isatty() else None
    preview = None
    if args.preview:
        preview = Preview(Path(args.preview), jobs[0].path.stem, args.preview_every, models.sd.scale_factor,
                          lambda image, path: _write(image, path, None, overwrite=True))  # fmt: skip
    return bar, combine(bar, preview)


def _write(image: PIL.Image.Image, path: Path, g: Generation | None, *, overwrite: bool) -> Path:
    fmt = image_format(path)
    if g is not None and fmt != "PNG":
        logger.warning("%s: only PNG files carry the generation parameters (A1111's and minisd's chunks)", path)
    info = {"pnginfo": png_info(g)} if g is not None and fmt == "PNG" else {}
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **info), overwrite=overwrite)


def write_image(image: PIL.Image.Image, job: batch.Job, *, overwrite: bool, numbered: bool) -> Path:
    """Write one image with its metadata. If its name was taken meanwhile (another run), a numbered
    one takes its place (`numbered`), else the error stands: an existing file is never replaced."""
    try:
        return _write(image, job.path, job.generation, overwrite=overwrite)
    except FileExistsError:
        if not numbered:
            raise
        return _write(image, output_names(job.path, 1, False)[0], job.generation, overwrite=False)


def cmd_generate(args: argparse.Namespace) -> int:
    """`minisd generate`: plan, check, load, then generate and write every image; returns the exit status."""
    if args.preview and args.preview_every < 1:
        raise ValueError("--preview-every: expected a positive number of steps")
    settings = requested(args)
    jobs, folder = plan_jobs(args, settings)  # 2. every destination ...
    check_sources(settings, args)  # ... and source, before loading
    if args.preview:
        Path(args.preview).mkdir(exist_ok=True)  # its parent must exist
        check_destination(Path(args.preview) / "preview.png", overwrite=True)
    world = batch.join_world(args.device)
    if world.distributed and args.device.type == "cuda":
        args.device = torch.device("cuda", world.local_rank)
    try:
        models = load_models(args, settings)
        recorded = getattr(args, "recorded_hash", None)
        if recorded and models.short_hash and recorded != models.short_hash:
            logger.warning("%s was made by model hash %s; this model's is %s: the image will differ",
                           args.from_png, recorded, models.short_hash)  # fmt: skip
        jobs = [resolve(j, models) for j in jobs]
        # shares of all the batches, then what is left of this one: what another rank has done meanwhile never
        # changes which batches this rank owns
        mine = [b for b in batch.share(batch.batches(jobs, args.batch_size), world.rank, world.size)
                if batch.todo(b, args.overwrite)]  # fmt: skip
        for n, group in enumerate(mine, start=1):
            bar, callback = callbacks(group, args, models, f"{'image' if len(group) == 1 else 'batch'} {n}/{len(mine)}")
            images = run_batch(group, models, callback)
            if bar is not None:
                bar.close()
            for image, job in zip(images, group, strict=True):
                if args.overwrite or not job.path.exists():
                    _print_line(write_image(image, job, overwrite=args.overwrite, numbered=folder is None))
            if folder is not None and not world.distributed:
                batch.write_index(folder, jobs)
        batch.barrier(world)
        if folder is not None and world.rank == 0:
            batch.write_index(folder, jobs)
    finally:
        batch.leave_world(world)
    return 0


# ---------------------------------------------------------------------- the parser
EXAMPLES = """examples:
  minisd generate "a red circle on a blue background"              the shipped tiny model, 32x32
  minisd generate "a lighthouse" --model sd15.safetensors --steps 30 --sampler dpmpp_2m_karras --seed 7 -o a.png
  minisd generate "oil painting" --model sd15.safetensors --init-image photo.png --strength 0.6
  minisd generate "a cat" --model sd15-inpainting.safetensors --init-image photo.png --mask mask.png
  minisd generate "a lion" --model sd_xl_base_1.0.safetensors --refiner sd_xl_refiner_1.0.safetensors
  minisd generate "a castle" --model sd15.safetensors --hires-scale 2 --hires-strength 0.5
  minisd generate --from-png out.png --steps 40                     the same picture, more steps
  minisd generate --prompts prompts.txt -o pictures/ --batch-size 4  index.jsonl; rerun to resume
  torchrun --nproc_per_node 8 -m minisd generate --prompts p.jsonl -o pictures/   a share per GPU

Every PNG carries A1111's "parameters" chunk and a JSON copy ("minisd"): `minisd info IMG.png` shows them.
An existing file is never replaced without --overwrite: the next free name (OUT-1.png, ...) is used."""


def positive_int(text: str) -> int:
    """argparse type: `text` as an integer >= 1 (ArgumentTypeError otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_generate(sub, model_args, device) -> None:
    """The `generate` subcommand (`model_args(parser, dtype_default)` adds --family/--config/--dtype)."""
    gen = sub.add_parser("generate", help="text to image, img2img, inpainting, refiner, hires fix, batches",
                         description="Generate images. Options left out come from --from-png, then the defaults.",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    what = gen.add_argument_group("what to draw")
    what.add_argument("prompt", nargs="?", help="the prompt (or --prompts FILE, or --from-png IMG)")
    what.add_argument("--negative", help="negative prompt (default: none)")
    what.add_argument("--prompts", metavar="FILE", help="one prompt per line, or a .jsonl of {\"prompt\": ..., "
                      "\"seed\": ..., any setting}; -o is then a folder, with index.jsonl")  # fmt: skip
    what.add_argument("--from-png", metavar="IMG", help="regenerate from an image's metadata; options override it")
    what.add_argument("--prompt-syntax", choices=PROMPT_SYNTAXES, help="(a:1.2) weights and [from:to:when] "
                      "edits: A1111's, ComfyUI's, or none (default: a1111)")  # fmt: skip
    model = gen.add_argument_group("model")
    model.add_argument("--model", help="checkpoint file or diffusers folder (default: minisd.TINY, 32x32 shapes)")
    model.add_argument("--vae", metavar="FILE", help="replace the model's VAE")
    model.add_argument("--lora", metavar="FILE[:SCALE]", action="append", help="apply a LoRA (repeatable)")
    model.add_argument("--embedding", metavar="FILE", action="append", help="a textual inversion (repeatable)")
    model.add_argument("--refiner", metavar="PATH", help="SDXL refiner: the base stops at --refiner-at, it ends")
    model.add_argument("--refiner-at", type=_fraction, help="fraction of the schedule run by the base (default 0.8)")
    model.add_argument("--refiner-config", metavar="JSON", help="the refiner's non-standard architecture")
    model.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda, cuda:1, mps (default: cuda if present)")  # fmt: skip
    model_args(model, None)
    samp = gen.add_argument_group("sampling (see `minisd samplers`)")
    samp.add_argument("--steps", type=positive_int, help=f"sampler steps (default {DEFAULT_STEPS})")
    samp.add_argument("--sampler", choices=SAMPLER_NAMES, metavar="NAME", help="default euler; `minisd samplers`")
    samp.add_argument("--spacing", choices=SPACINGS, help="diffusers' timestep_spacing (default leading)")
    samp.add_argument("--eta", type=_fraction, help="noise of ddim / ancestral / SDE samplers (their default)")
    samp.add_argument("--guidance", "--cfg", type=float, help="CFG scale (default: the family's, 7.5 / 5)")
    samp.add_argument("--guidance-rescale", type=_fraction, help="Lin et al. 2023's phi (default 0)")
    samp.add_argument("--clip-skip", type=positive_int, help="A1111's numbering: 1 = none (default), 2 = one layer")
    samp.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default 0)")
    size = gen.add_argument_group("size and pipelines")
    size.add_argument("--width", type=positive_int, help="pixels (default: the model's, or the init image's)")
    size.add_argument("--height", type=positive_int, help="pixels (default: as --width)")
    size.add_argument("--init-image", metavar="IMG", help="img2img from this image (same size as the output)")
    size.add_argument("--strength", type=_fraction, help="img2img: how much is repainted (default: family's)")
    size.add_argument("--mask", metavar="IMG", help="inpainting: white is repainted (needs --init-image)")
    size.add_argument("--hires-scale", type=float, help="hires fix: second pass at this scale (e.g. 2)")
    size.add_argument("--hires-strength", type=_fraction, help="hires fix: denoising strength (default 0.7)")
    size.add_argument("--hires-steps", type=positive_int, help="hires fix: second-pass steps (default: --steps)")
    size.add_argument("--hires-upscale", choices=tuple(HIRES_UPSCALERS), help="latent (A1111 'Latent', default), "
                      "latent-nearest, or pixel (decode, resize, encode)")  # fmt: skip
    out = gen.add_argument_group("output")
    out.add_argument("-o", "--output", help="image file (several: OUT, OUT-1, ...), or the "
                     "folder of --prompts (default out.png)")  # fmt: skip
    out.add_argument("--num-images", type=positive_int, default=1, help="images per prompt (seeds seed, seed+1..)")
    out.add_argument("--batch-size", type=positive_int, default=1, help="images per model call (default 1)")
    out.add_argument("--overwrite", action="store_true", help="replace existing images (and rerun a --prompts run)")
    out.add_argument("--preview", metavar="DIR", help="write the forming image x0 every few steps (cheap decode)")
    out.add_argument("--preview-every", type=int, default=5, metavar="N", help="steps between previews (default 5)")
    gen.set_defaults(func=cmd_generate)


def _print_line(path: Path) -> None:
    """One output path per line, in one write: under torchrun every rank prints to the same pipe, and
    `print` on an unbuffered stdout (PYTHONUNBUFFERED) writes the text and the newline separately, so two
    ranks' paths could run together on one line. A write of under 4 KiB (PIPE_BUF) to a pipe is atomic."""
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()
