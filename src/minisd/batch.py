"""Many images from one command: prompt files, batches, resume, an index, and shares across processes.

`minisd generate --prompts FILE -o DIR` turns a prompt file into a list of `Job`s, one per image, each
with its own seed and a file name fixed by its position (`00007-a-red-circle.png`). Then:

- **Batches** are formed from the whole list, in order, before anything else (`batches`): consecutive
  jobs with the same settings and consecutive seeds. So a batch is the same whatever runs it.
- **Shares:** under `torchrun` (`torch.distributed`), rank r of w runs batches r, r + w, r + 2w, ...
  (`share`). A job's seed depends on its position in the file, never on the rank, and its batch is
  the same at any world size: the set of images is identical whatever the world size.
- **Resume:** a batch whose files all exist is skipped; a batch cut short is run again whole (its
  images then come out as they would have) and only its missing files are written.
- **Index:** `index.jsonl` lists every image present, in job order: file, prompt, seed, settings and
  time (the file's modification time). It is rebuilt from the images' own metadata (`metadata`) and
  replaced atomically, so it never holds a partial line or a duplicate, even after a crash. Rank 0
  writes it, after every batch when it runs alone, and once every rank is done otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_write_text, check_source
from .metadata import Generation, read_generation

INDEX = "index.jsonl"
# settings a prompt file cannot change per prompt: the models are loaded once per run, and the rest is computed
PER_RUN = {"model", "refiner", "vae", "loras", "embeddings", "model_name", "model_hash", "lora_hashes", "version"}


@dataclass(frozen=True)
class Job:
    """One image to make: its request and its file."""

    generation: Generation
    path: Path


def read_prompts(path: str | Path) -> list[dict]:
    """A prompt file as one settings dict per prompt. A `.jsonl` file holds one JSON object per line
    (`{"prompt": ..., "seed": 3, "steps": 30, ...}`: any field of `metadata.Generation`); any other file
    holds one prompt per line. Blank lines, and lines starting with `#` in a plain file, are skipped."""
    path = check_source(path)
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or (path.suffix != ".jsonl" and text.startswith("#")):
            continue
        if path.suffix != ".jsonl":
            entries.append({"prompt": text})
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON object ({e.msg}); a .jsonl file has one per line") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'prompt', got {text[:60]!r}")
        Generation.from_mapping(entry, f"{path}:{number}")  # names a bad key or a missing prompt now
        fixed = sorted(set(entry) & PER_RUN)
        if fixed:
            raise ValueError(f"{path}:{number}: {fixed} are set for the whole run (on the command line), "
                             "not per prompt; run one command per model")  # fmt: skip
        entries.append({k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
    if not entries:
        raise ValueError(f"{path}: no prompts (one per line, or JSON objects in a .jsonl file)")
    return entries


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe short form of a prompt: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].strip("-") or "image"


def jobs_for(entries: Sequence[Mapping], base: Generation, folder: Path) -> list[Job]:
    """One job per entry: `base` with the entry's settings; seed `base.seed + k` for the k-th entry unless the
    entry gives one (per prompt, never per process); file `<k:05d>-<slug>.png`."""
    jobs = []
    for k, entry in enumerate(entries):
        g = dataclasses.replace(base, **{"seed": base.seed + k, **entry})
        jobs.append(Job(g, folder / f"{k:05d}-{slug(g.prompt)}.png"))
    return jobs


def _same_batch(a: Generation, b: Generation) -> bool:
    """Jobs run in one `generate` call when only their prompts differ and their seeds follow each other
    (image i of a call draws its noise from seed + i: `noise="a1111"`)."""
    strip = {"prompt": "", "negative_prompt": "", "seed": 0}
    return dataclasses.replace(a, **strip) == dataclasses.replace(b, **strip) and b.seed == a.seed + 1


def batches(jobs: Sequence[Job], size: int) -> list[list[Job]]:
    """The jobs cut into batches of at most `size`, in order (see the module docstring)."""
    out: list[list[Job]] = []
    for job in jobs:
        if out and len(out[-1]) < size and _same_batch(out[-1][-1].generation, job.generation):
            out[-1].append(job)
        else:
            out.append([job])
    return out


def share(items: Sequence, rank: int, world: int) -> list:
    """Rank `rank`'s share of `items`: every `world`-th, from index `rank`."""
    return list(items[rank::world])


def todo(batch: Sequence[Job], overwrite: bool) -> bool:
    """Whether `batch` still has work: True with `overwrite`, or when any of its files is missing.

        if batch.todo(jobs, overwrite=False): ...
    """
    return overwrite or not all(j.path.exists() for j in batch)


def index_records(jobs: Sequence[Job]) -> Iterator[dict]:
    """An index line per job whose file exists, read from the file's own metadata."""
    for job in jobs:
        if not job.path.exists():
            continue
        g = read_generation(job.path)
        when = datetime.datetime.fromtimestamp(job.path.stat().st_mtime, tz=datetime.timezone.utc)
        yield {"file": job.path.name, "prompt": g.prompt, "seed": g.seed, "settings": dataclasses.asdict(g),
               "time": when.isoformat()}  # fmt: skip


def write_index(folder: Path, jobs: Sequence[Job]) -> Path:
    """Replace `folder/index.jsonl` with the records of the images present (atomically)."""
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in index_records(jobs))
    return atomic_write_text(folder / INDEX, lines, overwrite=True)


# ---------------------------------------------------------------------- torch.distributed
@dataclass(frozen=True)
class World:
    """This process's place among those `torchrun` started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part (`torchrun` with WORLD_SIZE > 1)."""
        return self.size > 1


def join_world(device: torch.device) -> World:
    """Join the process group `torchrun` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): NCCL on CUDA, gloo on the CPU. Without WORLD_SIZE > 1, a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def barrier(world: World) -> None:
    """Wait until every process of `world` gets here (a no-op for a world of one).

        batch.barrier(world)
    """
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def leave_world(world: World) -> None:
    """Leave the process group `join_world` joined, if any (a no-op for a world of one).

        batch.leave_world(world)
    """
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
