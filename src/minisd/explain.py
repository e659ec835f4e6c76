"""`minisd explain "PROMPT"`: the walkthrough from prompt to pixels, run live and printed stage by stage.

It runs one text-to-image generation through the pipeline's own named steps (`pipeline.encode`,
`pipeline.draw_noise`, `pipeline.guided_denoiser`, `pipeline.sample`, `StableDiffusion.decode`:
the same calls, in the same order, as `pipeline.txt2img`, so the image is `generate`'s, bit for bit)
and prints what each stage made, with the file and function responsible:

1. the tokenizer's ids and their strings;          4. the sigma schedule;
2. the context's shape and statistics;             5. per step: sigma, x0-hat's statistics, the guidance difference;
3. SDXL's vector conditioning `y`;                 6. the final latent and the image.

Two read-only hooks watch the run without changing it: one on the U-Net's output (the guidance
difference F_cond - F_uncond, F the eps or v prediction), one on a cross-attention layer (`attn2`) that
recomputes its attention probabilities softmax(q k^T / sqrt(d)) from its own `to_q` / `to_k` (the model
calls `attention.attention`, which never materialises them). `--out DIR` saves the picture, the
trajectory of x0-hat per step, and the cross-attention map of every prompt token (docs/walkthrough).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from einops import rearrange

from .conditioning import MicroConditioning
from .model import GenerateRequest, StableDiffusion
from .pipeline import Noise, Prompt, Sampling, draw_noise, encode, guided_denoiser, latent_shape, sample
from .samplers import sampler_parts

Emit = Callable[[str], None]


# ---------------------------------------------------------------------- what a run records
@dataclass
class Step:
    """One sampler step as the callback saw it: sigma, x0-hat (the denoised estimate, VP latents at
    sigma 0) and the guidance difference F_cond - F_uncond of the U-Net's output (None without guidance)."""

    i: int
    sigma: float
    denoised: torch.Tensor
    guidance_diff: torch.Tensor | None


@dataclass
class Explained:
    """Everything `explain` printed, as tensors: the test compares them with the library's own."""

    token_ids: list[list[int]]  # per text encoder, [sot, ..., eot] without padding
    context: torch.Tensor  # (1, 77, context_dim), the prompt's (cond) side
    y: torch.Tensor | None  # SDXL's vector conditioning of the prompt, else None
    sigmas: torch.Tensor
    steps: list[Step]
    latents: torch.Tensor  # VP latents, as generate(output="latent")
    image: torch.Tensor  # (1, 3, H, W) in [0, 1], as generate(output="tensor")
    attention_layer: str
    attention: torch.Tensor  # (tokens, h, w): mean over steps and heads of the cond side's probabilities
    lines: list[str] = field(default_factory=list)


def stats(t: torch.Tensor) -> str:
    """shape, mean, std, min and max of a tensor, as explain prints them."""
    t = t.detach().float()
    return (f"shape {tuple(t.shape)}  mean {t.mean().item():+.4f}  std {t.std().item():.4f}  "
            f"min {t.min().item():+.4f}  max {t.max().item():+.4f}")  # fmt: skip


# ---------------------------------------------------------------------- the hooks
def cross_attention_layers(sd: StableDiffusion) -> list[str]:
    """The names of the U-Net's cross-attention modules (`...transformer_blocks.N.attn2`), in forward order."""
    return [name for name, _ in sd.unet.named_modules() if name.endswith(".attn2")]


def default_attention_layer(sd: StableDiffusion, latent_hw: tuple[int, int]) -> str:
    """The decoder-side cross-attention layer at the finest resolution that has one (where maps are sharpest,
    as in DAAM, Tang et al. 2023): the last `attn2` among those with the most query tokens."""
    sizes = {}
    hooks = [sd.unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: sizes.setdefault(n, a[0].shape[1]))
             for n in cross_attention_layers(sd)]  # fmt: skip
    try:
        probe_unet(sd, latent_hw)
    finally:
        for h in hooks:
            h.remove()
    most = max(sizes.values())
    return [n for n in cross_attention_layers(sd) if sizes.get(n) == most][-1]


@torch.no_grad()
def probe_unet(sd: StableDiffusion, latent_hw: tuple[int, int]) -> None:
    """One U-Net call on zeros, only to see the shapes its modules receive."""
    cfg, p = sd.unet.config, next(sd.unet.parameters())
    x = torch.zeros(1, cfg.in_channels, *latent_hw, device=p.device, dtype=p.dtype)
    context = torch.zeros(1, 77, cfg.context_dim, device=p.device, dtype=p.dtype)
    y = None if cfg.adm_in_channels is None else torch.zeros(1, cfg.adm_in_channels, device=p.device, dtype=p.dtype)
    sd.unet(x, torch.zeros(1, device=p.device), context, y)


def attention_probabilities(m: torch.nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """(B, heads, Lq, Lk) fp32: the probabilities a `CrossAttention` (unet.py) applies to its values for
    these inputs, softmax(q k^T / sqrt(d)) per head, recomputed with its own `to_q` / `to_k`."""
    q, k = m.to_q(x).float(), m.to_k(context).float()  # (B, L, heads * d)
    q, k = (rearrange(t, "b l (h d) -> b h l d", h=m.heads) for t in (q, k))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


class AttentionRecorder:
    """A forward hook on one `CrossAttention` (unet.py) that recomputes its probabilities
    P = softmax(q k^T / sqrt(d)) (Vaswani et al. 2017, eq. 1) per head from the module's own inputs and
    weights, and sums the cond half's head-mean over the calls. It returns nothing: the output is unchanged."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total: torch.Tensor | None = None
        self.calls = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, m, args, output) -> None:
        """Forward hook: add this call's head-mean cross-attention probabilities (cond side) to the total."""
        p = attention_probabilities(m, args[0], args[1])
        p = p.mean(dim=1)[-1]  # head mean of the last item: the cond side ([uncond, cond] when guided)
        self.total = p if self.total is None else self.total + p
        self.calls += 1

    def maps(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """(Lk, h, w): the mean probability each pixel of the layer gives each text token."""
        lq = self.total.shape[0]
        f = round(math.sqrt(latent_hw[0] * latent_hw[1] / lq))  # the layer's downsampling from the latents
        return rearrange(self.total / self.calls, "(h w) k -> k h w", h=latent_hw[0] // f)

    def remove(self) -> None:
        """Detach the hook from the module."""
        self.handle.remove()


class GuidanceRecorder:
    """A forward hook on the U-Net keeping its last output's F_cond - F_uncond (batch [uncond, cond],
    `denoisers.cfg_denoiser`), read by the sampler callback right after each step's first model call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.last: torch.Tensor | None = None
        self.handle = unet.register_forward_hook(self.hook)

    def hook(self, m, args, output) -> None:
        """Forward hook: keep the U-Net's cond - uncond output of this call (fp32)."""
        uncond, cond = output.float().chunk(2)
        self.last = cond - uncond

    def remove(self) -> None:
        """Detach the hook from the U-Net."""
        self.handle.remove()


# ---------------------------------------------------------------------- the run
@dataclass(frozen=True)
class Request:
    """What to explain: `generate(prompt, negative_prompt=, steps=, sampler=, guidance_scale=, seed=,
    height=, width=, original_size=, crop_coords_top_left=)`, one image; None: generate's default."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "euler"
    guidance_scale: float | None = None
    seed: int = 0
    size: tuple[int | None, int | None] | None = None  # (height, width); None, or a None side: generate's
    original_size: tuple[int, int] | None = None  # SDXL
    crop_coords_top_left: tuple[int, int] | None = None
    attention_layer: str | None = None

    def records(self, sd: StableDiffusion) -> tuple[Prompt, Sampling, Noise, tuple[int, int]]:
        """The pipeline's records, resolved by `StableDiffusion.generate`'s own `GenerateRequest`."""
        if self.original_size is not None and "original_size" not in sd.family.y_inputs:
            raise ValueError(f"original_size: the {sd.family.name!r} family has no size conditioning (SDXL's y); "
                             "drop --original-size")  # fmt: skip
        height, width = self.size or (None, None)
        request = GenerateRequest(self.prompt, negative_prompt=self.negative_prompt, width=width, height=height,
                                  steps=self.steps, guidance_scale=self.guidance_scale, sampler=self.sampler,
                                  seed=self.seed, original_size=self.original_size,
                                  crop_coords_top_left=self.crop_coords_top_left)  # fmt: skip
        inputs = request.resolve(sd)
        return inputs.text, inputs.sampling, inputs.noise, inputs.size


@torch.no_grad()
def explain(sd: StableDiffusion, request: Request, emit: Emit = lambda line: None) -> Explained:
    """Run `request` once, emitting each stage's report line by line (the CLI prints them), and return the tensors."""
    lines: list[str] = []

    def say(line: str = "") -> None:
        lines.append(line)
        emit(line)

    prompt, sampling, noise, size = request.records(sd)
    say(f"minisd explain: {request.prompt!r} on a {sd.family.name} model, {size[1]}x{size[0]} px, "
        f"{sampling.sampler} x {sampling.steps} steps, guidance {prompt.guidance_scale}, "
        f"seed {request.seed}")  # fmt: skip
    token_ids = explain_tokens(sd, request.prompt, say)
    conds = encode(sd, prompt)  # pipeline.py `encode`
    explain_context(sd, conds.cond["context"], say)
    y = conds.cond.get("y")
    if y is not None:
        explain_vector(sd, y, prompt.micro, say)
    plan = sampling.plan()
    explain_schedule(sampling, plan, say)

    shape = latent_shape(sd, prompt, size)
    x = draw_noise(sd, noise, shape) * plan.init_noise_sigma
    say(f"\n[5] start latents  (pipeline.py draw_noise; x = n * init_noise_sigma {plan.init_noise_sigma:.4f})")
    say(f"    x: {stats(x)}")
    layer = request.attention_layer or default_attention_layer(sd, shape[-2:])
    attn = AttentionRecorder(_attention_module(sd, layer))
    try:
        latents, steps = explain_sampling(sd, prompt, sampling, plan, conds, x, noise.generator, say)
    finally:
        attn.remove()
    say("\n[7] latents  (pipeline.py sample -> schedules.py to_variance_preserving: the VP latents the VAE reads)")
    say(f"    {stats(latents)}")
    image = sd.decode(latents, output="tensor")
    say(f"\n[8] image  (model.py StableDiffusion.decode -> vae.py AutoencoderKL.decode of latents / scale factor "
        f"{sd.scale_factor:.5g}; images.py to_unit_range)")  # fmt: skip
    say(f"    {stats(image)}")
    maps = attn.maps(tuple(shape[-2:]))
    say(f"\n    attention: {layer} ({maps.shape[1]}x{maps.shape[2]} queries), mean over {attn.calls} calls and heads")
    return Explained(token_ids, conds.cond["context"], y, plan.sigmas, steps, latents, image, layer, maps, lines)


def _attention_module(sd: StableDiffusion, name: str) -> torch.nn.Module:
    names = cross_attention_layers(sd)
    if name not in names:
        raise ValueError(f"--attention-layer: expected one of the U-Net's cross-attention layers {names}, got {name!r}")
    return sd.unet.get_submodule(name)


# ---------------------------------------------------------------------- the stages' reports
def token_strings(sd: StableDiffusion, ids: list[int]) -> list[str]:
    """Each id as text: `tokenizer.CLIPTokenizer.decode` of the id alone ("</w>" shows as a trailing space)."""
    special = {sd.tokenizer.sot_token_id: "<|startoftext|>", sd.tokenizer.eot_token_id: "<|endoftext|>"}
    return [special.get(i) or sd.tokenizer.decode([i]) for i in ids]


def explain_tokens(sd: StableDiffusion, text: str, say: Emit) -> list[list[int]]:
    """Stage 1: each text encoder's token ids, as `conditioning.encode_prompt` makes them."""
    say("\n[1] tokens  (tokenizer.py CLIPTokenizer.__call__: byte-level BPE, [sot] + ids + [eot], padded to 77)")
    out = []
    for k, use in enumerate(sd.text_uses):
        batch = sd.tokenizer(text, pad_token_id=use.pad_token_id, special_tokens=use.tokenizer)
        row = batch.input_ids[0].tolist()
        ids = row[: int(batch.eot_index[0]) + 1]
        out.append(ids)
        say(f"    encoder {k}: {len(ids)} tokens, then {77 - len(ids)} x pad id {use.pad_token_id}")
        say("    " + "  ".join(f"{i}:{s!r}" for i, s in zip(ids, token_strings(sd, ids))))
    return out


def explain_context(sd: StableDiffusion, context: torch.Tensor, say: Emit) -> None:
    """Stage 2: the context, read from which hidden state of which encoder."""
    say("\n[2] context  (conditioning.py encode_prompt -> clip.py TextTransformer; pipeline.py encode)")
    for k, (enc, use) in enumerate(zip(sd.text_encoders, sd.text_uses)):
        ln = " + ln_final" if use.final_ln else ""
        blocks = f"{enc.config.layers} blocks, width {enc.config.width}"
        say(f"    encoder {k}: {blocks}; reads hidden_states[{use.layer}]{ln}")
    say(f"    context: {stats(context)}")


def explain_vector(sd: StableDiffusion, y: torch.Tensor, micro: MicroConditioning, say: Emit) -> None:
    """Stage 3 (SDXL): y = [pooled text vector, 256 sinusoidal features per micro-conditioning number]."""
    say("\n[3] vector conditioning y  (conditioning.py vector_conditioning; Podell et al. 2023, sec. 2.2)")
    values = micro.values(negative=False)
    say("    inputs: " + ", ".join(f"{name} {values[name]}" for name in sd.family.y_inputs))
    pooled = y.shape[1] - 256 * sum(len(values[n]) for n in sd.family.y_inputs)
    say(f"    y: {stats(y)}  (pooled {pooled} + {y.shape[1] - pooled} size/crop features)")


def explain_schedule(sampling: Sampling, plan, say: Emit) -> None:
    """Stage 4: the sigmas the sampler steps through, and the U-Net timestep of each."""
    kind = sampler_parts(sampling.sampler)[1]  # "discrete", "karras" or "exponential"
    where = f"samplers.py plan_sampler -> schedules.py {kind}_sigmas"
    say(f"\n[4] sigma schedule  ({where}; spacing {sampling.spacing!r}); t: the U-Net timestep of each sigma")
    t = sampling.schedule.sigma_to_t(plan.sigmas[:-1], quantize=plan.quantize)
    say("    sigma: " + " ".join(f"{s:.4g}" for s in plan.sigmas.tolist()))
    say("    t:     " + " ".join(f"{v:.1f}" for v in t.tolist()))


def explain_sampling(sd: StableDiffusion, prompt: Prompt, sampling: Sampling, plan, conds, x: torch.Tensor,
                     generator: torch.Generator, say: Emit) -> tuple[torch.Tensor, list[Step]]:  # fmt: skip
    """Stage 6: `pipeline.guided_denoiser` and `pipeline.sample`, a line per step; returns the VP latents and steps."""
    model = guided_denoiser(sd, sampling, plan, prompt, conds)
    guidance = GuidanceRecorder(sd.unet) if prompt.guided else None
    cfg = " + cfg_denoiser" if prompt.guided else ""
    say(f"\n[6] sampling  (pipeline.py sample -> samplers.py sample_{sampler_parts(sampling.sampler)[0]}; "
        f"D(x, sigma): denoisers.py DiscreteDenoiser{cfg})")  # fmt: skip
    say("    x0-hat = the denoised estimate D(x, sigma); guidance diff = std of F_cond - F_uncond "
        "(F: the U-Net's " + ("epsilon" if sd.prediction_type == "epsilon" else "v") + " output)")  # fmt: skip
    say(f"    {'step':>4} {'sigma':>9} {'x0-hat mean':>12} {'x0-hat std':>11} {'guidance diff':>14}")
    steps: list[Step] = []

    def on_step(info: dict) -> None:
        diff = None if guidance is None else guidance.last
        step = Step(info["i"], float(info["sigma"]), info["denoised"].clone(), diff)
        steps.append(step)
        d = step.denoised
        g = "-" if diff is None else f"{diff.std().item():.4f}"
        say(f"    {step.i:>4} {step.sigma:>9.4f} {d.mean().item():>+12.4f} {d.std().item():>11.4f} {g:>14}")

    try:
        latents = sample(plan, model, x, plan.sigmas, generator, on_step).latents
    finally:
        if guidance is not None:
            guidance.remove()
    return latents, steps


# ---------------------------------------------------------------------- pictures
SCALE = 4  # a 32x32 picture is shown at 128x128, nearest-neighbour, so its pixels stay visible


def font(size: int = 11) -> PIL.ImageFont.ImageFont:
    """PIL's default font at `size` pixels."""
    return PIL.ImageFont.load_default(size=size)


def tile(image: PIL.Image.Image, side: int, label: str = "") -> PIL.Image.Image:
    """`image` scaled to `side` px (NEAREST) with an optional label strip below."""
    pad = 16 if label else 0
    out = PIL.Image.new("RGB", (side, side + pad), "white")
    out.paste(image.convert("RGB").resize((side, side), PIL.Image.NEAREST), (0, 0))
    if label:
        PIL.ImageDraw.Draw(out).text((2, side + 2), label, fill="black", font=font())
    return out


def row(tiles: list[PIL.Image.Image], gap: int = 4) -> PIL.Image.Image:
    """Tiles side by side on white."""
    w = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    out = PIL.Image.new("RGB", (w, max(t.height for t in tiles)), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    return out


def heat(values: torch.Tensor) -> PIL.Image.Image:
    """A 2-D map scaled to [0, 1] by its own max, as a black -> red -> yellow -> white image ("hot")."""
    v = (values / values.max().clamp_min(1e-12)).clamp(0, 1).cpu()
    rgb = torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)])
    return PIL.Image.fromarray((rgb * 255).round().byte().permute(1, 2, 0).numpy())


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """(3, H, W) in [0, 1] -> PIL."""
    return PIL.Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def trajectory_picture(sd: StableDiffusion, steps: list[Step], most: int = 10) -> PIL.Image.Image:
    """x0-hat decoded at up to `most` evenly spaced steps (the last included), labelled with sigma."""
    n = min(most, len(steps))
    pick = sorted({round(k * (len(steps) - 1) / max(n - 1, 1)) for k in range(n)})
    images = sd.decode(torch.cat([steps[k].denoised for k in pick]), output="tensor")
    side = images.shape[-1] * SCALE
    return row([tile(to_pil(im), side, f"s={steps[k].sigma:.3g}") for k, im in zip(pick, images)])


def attention_picture(sd: StableDiffusion, run: Explained, encoder: int = 0) -> PIL.Image.Image:
    """The image, then one heat map per prompt token (sot and eot left out), each upsampled to the image size."""
    ids = run.token_ids[encoder]
    words = token_strings(sd, ids)
    side = run.image.shape[-1] * SCALE
    tiles = [tile(to_pil(run.image[0]), side, "image")]
    for k in range(1, len(ids) - 1):  # the maps live at the layer's resolution; nearest shows it honestly
        tiles.append(tile(heat(run.attention[k]), side, words[k].strip()))
    return row(tiles)


def save_pictures(sd: StableDiffusion, run: Explained, out: Path) -> list[Path]:
    """image.png, trajectory.png and attention.png in `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    side = run.image.shape[-1] * SCALE
    paths = [out / "image.png", out / "trajectory.png", out / "attention.png"]
    tile(to_pil(run.image[0]), side).save(paths[0])
    trajectory_picture(sd, run.steps).save(paths[1])
    attention_picture(sd, run).save(paths[2])
    return paths


# ---------------------------------------------------------------------- the command
_EXAMPLES = """examples:
  minisd explain "a red circle on a blue background"
  minisd explain "a small yellow star in the top left on a black background" --steps 10 --out explained/
  minisd explain "a lighthouse" --model sd15.safetensors --steps 20 --sampler dpmpp_2m --seed 7
  minisd explain "a lighthouse" --model sdxl.safetensors --original-size 256 256   (SDXL: watch y change)
"""


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `explain` to an argparse subparsers object (`minisd.cli`)."""
    from .samplers import SAMPLER_NAMES

    p = sub.add_parser(
        "explain", help="run one prompt and print every stage from tokens to pixels (the docs' walkthrough, live)",
        description="Run PROMPT once (text-to-image, the same calls as `minisd generate`) and print each stage in "
        "order with the file and function responsible: token ids, the context, SDXL's vector conditioning, the "
        "sigma schedule, each step's sigma / x0-hat / guidance difference, the latents and the image. --out saves "
        "the image, the x0-hat trajectory and one cross-attention layer's map per prompt token.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("prompt")
    p.add_argument("--model", help="checkpoint (default: minisd.TINY, the shipped 32x32 model)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--sampler", default="euler", choices=SAMPLER_NAMES, metavar="NAME", help="(default euler)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), help="SDXL's original_size")
    p.add_argument("--attention-layer", help="the attn2 module to map (default: the finest decoder-side one)")
    p.add_argument("--out", metavar="DIR", help="save image.png, trajectory.png and attention.png here")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """The `explain` command: print the stages, save the pictures; 0 on success."""
    from .cli import _model_and_size  # noqa: PLC0415 - cli imports this module's add_parser
    from .model import load

    if args.steps < 1:
        raise ValueError(f"--steps: expected a positive integer, got {args.steps}")
    model, (height, width) = _model_and_size(args.model, args.height, args.width)
    sd = load(model)
    original_size = tuple(args.original_size) if args.original_size else None
    request = Request(args.prompt, args.negative_prompt, args.steps, args.sampler, args.guidance, args.seed,
                      (height, width), original_size, attention_layer=args.attention_layer)  # fmt: skip
    run = explain(sd, request, print)
    if args.out:
        for path in save_pictures(sd, run, Path(args.out)):
            print(f"saved {path}")
    return 0
