"""Generation parameters in PNG files: A1111's `parameters` text chunk and minisd's JSON copy.

Every PNG minisd writes carries two text chunks:

- `parameters`: A1111's "infotext", which A1111, ComfyUI, sd-parsers, civitai and image viewers read:

      a red circle
      Negative prompt: blurry
      Steps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: 1, Size: 512x512, ...

  The format is A1111's `create_infotext` (modules/processing.py): the prompt, an optional
  "Negative prompt:" line, then `key: value` pairs joined by ", ", a value quoted as JSON when it holds
  a comma, a colon or a newline (`quote`, modules/infotext_utils.py). Keys that do not apply are left out.
- `minisd`: the same request as JSON (`Generation`), exact and typed, which `minisd generate --from-png`
  reads back. An image without it (one made by A1111) is read from its infotext (`from_infotext`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import PIL.Image
import PIL.PngImagePlugin

from .files import atomic_write
from .pipeline import HIRES_UPSCALERS
from .samplers import SAMPLER_NAMES, SAMPLERS, SIGMA_SCHEDULES, sampler_parts

PARAMETERS_KEY = "parameters"  # A1111's chunk
JSON_KEY = "minisd"  # minisd's exact copy


@dataclass(frozen=True)
class Generation:
    """One image's request, as the command line runs it (`minisd generate`), with every default resolved.

    `clip_skip` uses A1111's numbering (1 = the family's own layer; 2 = one block earlier, the library's
    `clip_skip=1`). `seed` is the image's own seed: its initial noise is drawn from it alone (`noise="a1111"`).
    Paths are as given on the command line; `model_hash` is A1111's short hash (first 10 hex digits of the
    file's SHA-256)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "euler"
    spacing: str = "leading"
    eta: float | None = None
    guidance_scale: float | None = None  # None until resolved: the family's default
    guidance_rescale: float = 0.0
    clip_skip: int = 1
    seed: int = 0
    width: int | None = None  # None until resolved: the init image's size, or the model's
    height: int | None = None
    prompt_syntax: str = "a1111"
    init_image: str | None = None
    mask: str | None = None
    strength: float | None = None
    hires_scale: float | None = None
    hires_strength: float = 0.7
    hires_steps: int | None = None
    hires_upscale: str = "latent"
    refiner: str | None = None
    refiner_at: float = 0.8
    loras: tuple[str, ...] = ()  # FILE[:SCALE], as given
    embeddings: tuple[str, ...] = ()
    vae: str | None = None
    model: str | None = None  # None: the shipped minisd.TINY
    model_name: str = ""
    model_hash: str | None = None
    lora_hashes: tuple[str, ...] = ()  # "name: hash", A1111's "Lora hashes"
    version: str = ""

    def to_json(self) -> str:
        """The settings as a JSON object with sorted keys."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, data: Mapping, where: str) -> Generation:
        """A `Generation` from its JSON form; an unknown key, a missing prompt or a wrong type is a ValueError."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        if not isinstance(data.get("prompt"), str):
            raise ValueError(f"{where}: expected a string 'prompt', got {data.get('prompt')!r}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def a1111_sampler(name: str) -> tuple[str, str]:
    """(A1111's "Sampler", "Schedule type") of a minisd sampler name: dpmpp_2m_karras -> ("DPM++ 2M", "Karras")."""
    base, kind = sampler_parts(name)
    return SAMPLERS[base].a1111, SIGMA_SCHEDULES[kind][1]


def quote(value: object) -> str:
    """A1111's `infotext_utils.quote`: a value with a comma, colon or newline becomes a JSON string."""
    text = str(value)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def _number(x: float) -> str:
    return f"{x:g}"


def infotext(g: Generation) -> str:
    """A1111's infotext for `g` (the key order of A1111 1.10's `create_infotext`)."""
    sampler, schedule = a1111_sampler(g.sampler)
    strength = g.hires_strength if g.hires_scale is not None else g.strength
    pairs = {
        "Steps": g.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": _number(g.guidance_scale),
        "Seed": g.seed,
        "Size": f"{g.width}x{g.height}",
        "Model hash": g.model_hash,
        "Model": g.model_name or None,
        "VAE": Path(g.vae).stem if g.vae else None,
        "Denoising strength": None if strength is None else _number(strength),
        "Clip skip": g.clip_skip if g.clip_skip > 1 else None,  # A1111 leaves out 1, the default
        "Hires upscale": None if g.hires_scale is None else _number(g.hires_scale),
        "Hires steps": g.hires_steps if g.hires_scale is not None else None,
        "Hires upscaler": HIRES_UPSCALERS[g.hires_upscale][1] if g.hires_scale is not None else None,
        "Refiner": Path(g.refiner).stem if g.refiner else None,
        "Refiner switch at": _number(g.refiner_at) if g.refiner else None,
        "CFG rescale phi": _number(g.guidance_rescale) if g.guidance_rescale else None,  # A1111's CFG-rescale
        "Lora hashes": ", ".join(g.lora_hashes) or None,
        "Version": g.version or None,
    }
    text = ", ".join(f"{k}: {quote(v)}" for k, v in pairs.items() if v is not None)
    negative = f"\nNegative prompt: {g.negative_prompt}" if g.negative_prompt else ""
    return f"{g.prompt}{negative}\n{text}"


def png_info(g: Generation) -> PIL.PngImagePlugin.PngInfo:
    """PNG text chunks for `g`: A1111-style parameters and minisd's JSON.

        image.save("out.png", pnginfo=png_info(generation))
    """
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, infotext(g))
    info.add_text(JSON_KEY, g.to_json())
    return info


def save_png(image: PIL.Image.Image, path: str | Path, g: Generation, *, overwrite: bool) -> Path:
    """Write `image` with its parameters, atomically (`files.atomic_write`): never a half-written file."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(g)), overwrite=overwrite)


def read_text(path: str | Path) -> dict[str, str]:
    """The text chunks of an image (PIL reads those before the pixel data)."""
    with PIL.Image.open(path) as image:
        return dict(getattr(image, "text", {}) or image.info)


def read_generation(path: str | Path) -> Generation:
    """The request an image records: minisd's JSON chunk, else A1111's infotext; a ValueError if it has neither."""
    text = read_text(path)
    if JSON_KEY in text:
        try:
            data = json.loads(text[JSON_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: the {JSON_KEY!r} chunk is not JSON ({e})") from None
        return Generation.from_mapping(data, f"{path}: {JSON_KEY!r} chunk")
    if PARAMETERS_KEY in text:
        return from_infotext(text[PARAMETERS_KEY], str(path))
    raise ValueError(f"{path}: no generation parameters (neither an A1111 'parameters' nor a 'minisd' chunk)")


# A1111's infotext_utils.re_param_code: `key: value` pairs, a value plain or a JSON-quoted string.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters) of an A1111 infotext (A1111's `parse_generation_parameters`)."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # no parameter line: all of it is the prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    params = {k.strip(): json.loads(v) if v.startswith('"') else v.strip() for k, v in _PAIR.findall(last)}
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), params


def _minisd_sampler(sampler: str, schedule: str, where: str) -> str:
    by_a1111 = {spec.a1111: base for base, spec in SAMPLERS.items()}
    kinds = {v[1]: k for k, v in SIGMA_SCHEDULES.items()} | {"Automatic": "discrete"}
    base = by_a1111.get(sampler)
    kind = kinds.get(schedule or "Automatic")
    name = None if base is None or kind is None else base if kind == "discrete" else f"{base}_{kind}"
    if name not in SAMPLER_NAMES:
        raise ValueError(f"{where}: A1111 sampler {sampler!r} with schedule {schedule!r} has no minisd equivalent; "
                         f"pass --sampler (one of {', '.join(SAMPLER_NAMES)})")  # fmt: skip
    return name


def from_infotext(text: str, where: str) -> Generation:
    """A `Generation` from an A1111 infotext: the prompts and the parameters minisd has (the rest is ignored)."""
    prompt, negative, p = parse_infotext(text)
    try:
        size = _SIZE.match(p.get("Size", "512x512"))
        kw = dict(
            steps=int(p.get("Steps", 20)),
            guidance_scale=float(p.get("CFG scale", 7.0)),
            seed=int(p.get("Seed", 0)),
            width=int(size.group(1)),
            height=int(size.group(2)),
            clip_skip=int(p.get("Clip skip", 1)),
            sampler=_minisd_sampler(p.get("Sampler", "Euler"), p.get("Schedule type", ""), where),
        )
        if "Hires upscale" in p:
            kw.update(hires_scale=float(p["Hires upscale"]), hires_strength=float(p.get("Denoising strength", 0.7)),
                      hires_steps=int(p["Hires steps"]) if "Hires steps" in p else None)  # fmt: skip
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot read the A1111 parameters ({e})") from None
    return Generation(prompt=prompt, negative_prompt=negative, model_name=p.get("Model", ""),
                      model_hash=p.get("Model hash"), **kw)  # fmt: skip
