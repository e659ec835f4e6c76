"""The machinery shared by minisd's training loops (`train.train` for the U-Net, `train.train_vae`).

A loop is a `Task` (what is trained, the loss as a module, how a batch becomes its inputs) run by
`run_loop`, which owns everything around the loss:

- data order: an epoch-wise permutation drawn from (seed, epoch), cut into global batches; rank r
  of n reads the r-th n-th of each (as `DistributedSampler`, but a global batch is the same set of
  items for any n);
- randomness: each step draws from generators seeded by (seed, step), for the *global* batch, and
  keeps its rank's slice (`Draws`). Nothing random carries state from step to step, so a resumed
  run draws exactly what an uninterrupted one would, and 1 process with batch B sees the numbers
  that n ranks with B/n each see;
- AdamW, linear warm-up, gradient clipping, mixed precision (`torch.autocast`; fp16 with a
  `GradScaler`, CUDA only), EMA weights (LDM's `LitEma`), DDP under `torchrun`;
- a checkpoint (`checkpoint.pt`: weights, optimizer, EMA, scaler, step, config) and resume;
- a JSONL loss log, `logging` lines, a progress bar on a terminal, periodic preview PNGs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .images import tensor_to_pil

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
# Config fields that may differ between a run and its resumption: they say how long and how often,
# not what is computed. Any other difference is refused (the resumed run would not be the same run).
CADENCE_FIELDS = frozenset(
    {"steps", "log_every", "sample_every", "checkpoint_every", "num_workers", "sample_prompts", "sample_steps",
     "sample_guidance", "scale_samples"}
)  # fmt: skip
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------- randomness
def derived_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator seeded by (seed, *keys) through BLAKE2b: independent streams per key, stable
    across processes and platforms (Python's `hash` of a str is not)."""
    text = ":".join(str(k) for k in (seed, *keys))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


@dataclass(frozen=True)
class Draws:
    """One step's random draws for this rank: each is drawn for the whole global batch on the CPU
    from the step's generator (draws come in the order they are asked for) and sliced to this
    rank's samples, then moved to `device`."""

    generator: torch.Generator
    global_batch: int
    part: slice  # this rank's samples within the global batch
    device: torch.device

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal `(b, *shape)` fp32."""
        return torch.randn((self.global_batch, *shape), generator=self.generator)[self.part].to(self.device)

    def rand(self) -> torch.Tensor:
        """Uniform [0, 1) `(b,)` fp32."""
        return torch.rand(self.global_batch, generator=self.generator)[self.part].to(self.device)

    def randint(self, high: int) -> torch.Tensor:
        """Integers in [0, high), `(b,)` int64."""
        return torch.randint(0, high, (self.global_batch,), generator=self.generator)[self.part].to(self.device)


# ---------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run: rank r of `world` (1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this is the main process (rank 0)."""
        return self.rank == 0

    def part(self, global_batch: int) -> slice:
        """This process's slice of a global batch of `global_batch` items."""
        b = global_batch // self.world
        return slice(self.rank * b, (self.rank + 1) * b)


def init_processes(device: torch.device) -> Processes:
    """Join the process group `torchrun` describes (WORLD_SIZE, RANK, MASTER_ADDR, ... in the
    environment): NCCL for CUDA, gloo for the CPU. A group someone already started (a test's
    FileStore) is used as is; without either, one process."""
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Processes(dist.get_rank(), dist.get_world_size())
    return Processes()


def all_mean(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The mean of `values` over the ranks (each rank's batch part has the same size)."""
    if procs.world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= procs.world
    return values


# ---------------------------------------------------------------------------------- data
def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Items -> a batch: strings become lists, tensors and number pairs are stacked."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], str):
            batch[key] = list(values)
            continue
        tensors = [torch.as_tensor(v) for v in values]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"data[{key!r}]: expected one shape per batch (crop or resize the data), got {shapes}")
        batch[key] = torch.stack(tensors)
    return batch


def batches(data: Dataset, cfg: Any, procs: Processes, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(step, this rank's part of the global batch) for steps start .. cfg.steps - 1.

    Epoch e visits the items in `randperm(len(data))` drawn from (seed, "order", e), in whole
    global batches (the last partial batch is dropped, as `drop_last=True`); step s is batch
    s mod (len // batch) of epoch s // (len // batch). A dataset with `set_epoch` (the
    `DistributedSampler` convention) is told the epoch before its items are read."""
    n, per_epoch = len(data), len(data) // cfg.batch_size
    part = procs.part(cfg.batch_size)
    step = start
    while step < cfg.steps:
        epoch, first = divmod(step, per_epoch)
        order = torch.randperm(n, generator=derived_generator(cfg.seed, "order", epoch)).tolist()
        last = min(per_epoch, first + cfg.steps - step)
        plan = [order[j * cfg.batch_size : (j + 1) * cfg.batch_size][part] for j in range(first, last)]
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        for batch in DataLoader(data, batch_sampler=plan, collate_fn=collate, num_workers=cfg.num_workers):
            yield step, batch
            step += 1


# ---------------------------------------------------------------------------------- EMA
class EMA:
    """An exponential moving average of the trained parameters, kept in fp32 (LDM's `LitEma`):

        shadow <- d * shadow + (1 - d) * theta,   d = min(decay, (1 + n) / (10 + n)),

    n the number of updates so far: the warm-up lets the average follow the fast early changes of
    a run from scratch instead of remembering the initial weights for 1 / (1 - decay) steps."""

    def __init__(self, modules: Mapping[str, nn.Module], decay: float) -> None:
        self.decay, self.num_updates = decay, 0
        self.shadow = {
            name: {k: p.detach().float().clone() for k, p in m.named_parameters() if p.requires_grad}
            for name, m in modules.items()
        }

    @torch.no_grad()
    def update(self, modules: Mapping[str, nn.Module]) -> None:
        """Move the shadow weights toward the modules' current ones (decay warms up with the update count)."""
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, m in modules.items():
            shadow = self.shadow[name]
            for k, p in m.named_parameters():
                if k in shadow:
                    shadow[k].lerp_(p.detach().float(), 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        """The EMA's state (decay, update count, shadow weights) for a checkpoint."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the update count and shadow weights from `state_dict()`'s output."""
        self.num_updates = int(state["num_updates"])
        for name, weights in state["shadow"].items():
            for k, v in weights.items():
                self.shadow[name][k].copy_(v)


@torch.no_grad()
def copy_weights(modules: Mapping[str, nn.Module], weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Copy `weights[name][param]` into each module's parameters (cast to the parameter's dtype)."""
    for name, m in modules.items():
        params = dict(m.named_parameters())
        for k, v in weights[name].items():
            params[k].copy_(v)


@contextlib.contextmanager
def swapped(
    modules: Mapping[str, nn.Module], weights: Mapping[str, Mapping[str, torch.Tensor]] | None
) -> Iterator[None]:
    """Run a block with `weights` (e.g. the EMA) in the modules, then put the trained weights back."""
    if weights is None:
        yield
        return
    saved = {name: {k: p.detach().clone() for k, p in m.named_parameters() if k in weights[name]}
             for name, m in modules.items()}  # fmt: skip
    copy_weights(modules, weights)
    try:
        yield
    finally:
        copy_weights(modules, saved)


# ---------------------------------------------------------------------------------- reporting
class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (tqdm's look, no tqdm)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled and sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        """Redraw the bar for `step` with `loss` (at most every 0.2 s, and always at the end)."""
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and step < self.total):
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        filled = int(30 * step / self.total)
        eta_text = f"{int(eta) // 60}:{int(eta) % 60:02d}" if math.isfinite(eta) else "?"
        bar = "#" * filled + "." * (30 - filled)
        sys.stderr.write(f"\r{step}/{self.total} [{bar}] loss {loss:.4f}  {rate:.2f} it/s  eta {eta_text} ")
        sys.stderr.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled:
            sys.stderr.write("\n")


class LossLog:
    """`log.jsonl`: one JSON record per step. On resume, records after the checkpoint's step (written
    by the interrupted run) are dropped, so the file always describes the weights' own history."""

    def __init__(self, path: Path, keep_until: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if path.exists() and keep_until > 0:
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` as one JSON line (main process only)."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def save_grid(images: Sequence[PIL.Image.Image] | torch.Tensor, path: Path, columns: int = 8) -> Path:
    """Images (PIL, or a `(B, 3, H, W)` tensor in [0, 1]) tiled in rows of `columns`, as one PNG."""
    if isinstance(images, torch.Tensor):
        images = tensor_to_pil(images.clamp(0, 1))
    w, h = images[0].size
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    grid = PIL.Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# ---------------------------------------------------------------------------------- the loop
@dataclass
class Task:
    """What one training loop trains.

    Attributes:
        modules: the trained modules by name (their parameters with `requires_grad` are optimized,
            averaged by the EMA and saved in the checkpoint).
        objective: the loss as a module (so DDP can wrap it): `objective(**inputs)` returns the mean
            loss of this rank's samples and a dict of scalar metrics to log.
        prepare: (this rank's batch, the step's draws) -> the objective's inputs, under no_grad
            (e.g. encode images to latents, draw the noise and timesteps).
        preview: writes a PNG of what the model does now, given the file to write; run on rank 0
            with the EMA weights swapped in, every `sample_every` steps.
    """

    modules: dict[str, nn.Module]
    objective: nn.Module
    prepare: Callable[[dict[str, Any], Draws], dict[str, Any]]
    preview: Callable[[Path], Any] = lambda path: None
    # DDP must look for parameters that get no gradient: a text encoder read below its last block (SD2).
    find_unused_parameters: bool = False


@dataclass
class LoopResult:
    """What `run_loop` returns (see `train.TrainResult`, which extends it)."""

    step: int
    start_step: int
    losses: list[float]
    ema: dict[str, dict[str, torch.Tensor]] | None
    checkpoint: Path
    log: Path
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    """The state `run_loop` threads through the steps."""

    task: Task
    cfg: Any
    out_dir: Path
    procs: Processes
    device: torch.device
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    model: nn.Module  # the objective, wrapped in DDP when world > 1
    log: LossLog | None = None


def check_loop_config(cfg: Any, data: Dataset, procs: Processes, device: torch.device) -> None:
    """The mechanics fields against the data and the processes (each config checks its own ranges)."""
    name = type(cfg).__name__
    if cfg.batch_size % procs.world:
        raise ValueError(f"{name}.batch_size: expected a multiple of the {procs.world} processes, got {cfg.batch_size}")
    if len(data) < cfg.batch_size:
        raise ValueError(f"data: expected at least batch_size={cfg.batch_size} items, got {len(data)}")
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(f"{name}.mixed_precision: fp16 needs CUDA (a GradScaler), got device {device}; use 'bf16'")


def _setup(task: Task, data: Dataset, cfg: Any, out_dir: Path) -> _Run:
    device = next(task.objective.parameters()).device
    procs = init_processes(device)
    check_loop_config(cfg, data, procs, device)
    params = [p for m in task.modules.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter of the trained modules has requires_grad=False")
    bad = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if bad:
        raise ValueError(f"trained weights: expected float32 (use mixed_precision for speed), got {bad}")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    ema = EMA(task.modules, cfg.ema_decay) if cfg.ema_decay is not None else None
    model = task.objective
    if procs.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            task.objective, device_ids=ids, find_unused_parameters=task.find_unused_parameters
        )
    if procs.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    return _Run(task, cfg, out_dir, procs, device, params, optimizer, scaler, ema, model)


def _resume(run: _Run, resume: bool) -> int:
    """Load `checkpoint.pt` if there is one (and `resume`): the step to continue from."""
    path = run.out_dir / CHECKPOINT_NAME
    if not (resume and path.exists()):
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = state["config"], dataclasses.asdict(run.cfg)
    for key in sorted(set(saved) | set(now)):
        if key not in CADENCE_FIELDS and _plain(saved.get(key)) != _plain(now.get(key)):
            raise ValueError(
                f"{type(run.cfg).__name__}.{key}: the checkpoint in {run.out_dir} was trained with "
                f"{saved.get(key)!r}, got {now.get(key)!r}; resume with the same config or a fresh out_dir"
            )
    if state["step"] > run.cfg.steps:
        raise ValueError(f"steps: the checkpoint is at step {state['step']}, got steps={run.cfg.steps}")
    copy_weights(run.task.modules, state["modules"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    logger.info("resumed %s at step %d", path, state["step"])
    return int(state["step"])


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (a config read back from JSON has lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _save_checkpoint(run: _Run, step: int) -> None:
    """Write `checkpoint.pt` atomically (a temporary file, then a rename), rank 0 only."""
    if not run.procs.main:
        return
    state = {
        "step": step,
        "config": dataclasses.asdict(run.cfg),
        "modules": {name: {k: p.detach() for k, p in m.named_parameters() if p.requires_grad}
                    for name, m in run.task.modules.items()},  # fmt: skip
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else {},
    }
    path = run.out_dir / CHECKPOINT_NAME
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


def _autocast(run: _Run):
    if run.cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=_HALF[run.cfg.mixed_precision])


def _step(run: _Run, step: int, batch: dict[str, Any]) -> dict[str, float]:
    """One optimizer step on the global batch; returns the logged values (averaged over ranks)."""
    cfg = run.cfg
    # Linear warm-up to lr, then constant (the SD recipe: LambdaLinearScheduler with f_start 1e-6, f_max 1).
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    draws = Draws(derived_generator(cfg.seed, "step", step), cfg.batch_size, run.procs.part(cfg.batch_size),
                  run.device)  # fmt: skip
    with torch.no_grad():
        inputs = run.task.prepare(batch, draws)
    with _autocast(run):
        loss, metrics = run.model(**inputs)
    run.scaler.scale(loss).backward()  # DDP averages the gradients over the ranks here
    run.scaler.unscale_(run.optimizer)
    if cfg.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.params if p.grad is not None]))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.task.modules)
    names = ["loss", *metrics]
    values = all_mean(torch.stack([loss.detach().float(), *(v.detach().float() for v in metrics.values())]), run.procs)
    return {"lr": lr, "grad_norm": float(grad_norm), **dict(zip(names, values.tolist()))}


def run_loop(task: Task, data: Dataset, cfg: Any, out_dir: str | Path, *, resume: bool = True) -> LoopResult:
    """Train `task` on `data` for `cfg.steps` steps (resuming from `out_dir/checkpoint.pt` if it exists
    and `resume`); writes the checkpoint, the JSONL log and the previews into `out_dir`."""
    out_dir = Path(out_dir)
    run = _setup(task, data, cfg, out_dir)
    start = _resume(run, resume)
    run.log = LossLog(out_dir / LOG_NAME, start, run.procs.main)
    progress = Progress(cfg.steps, start, run.procs.main)
    for m in task.modules.values():
        m.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        for step, batch in batches(data, cfg, run.procs, start):
            record = {"step": step + 1, **_step(run, step, batch), "time": round(time.perf_counter() - t0, 3)}
            losses.append(record["loss"])
            _after_step(run, record, progress)
    finally:
        progress.close()
        for m in task.modules.values():
            m.eval()
    seconds = time.perf_counter() - t0
    if start < cfg.steps or not (out_dir / CHECKPOINT_NAME).exists():
        _save_checkpoint(run, cfg.steps)
    if run.procs.main and start < cfg.steps:
        logger.info("trained steps %d-%d in %.1f s (%.2f it/s)", start + 1, cfg.steps, seconds,
                    (cfg.steps - start) / max(seconds, 1e-9))  # fmt: skip
    ema = run.ema.shadow if run.ema is not None else None
    return LoopResult(cfg.steps, start, losses, ema, out_dir / CHECKPOINT_NAME, out_dir / LOG_NAME, seconds)


def _after_step(run: _Run, record: dict[str, Any], progress: Progress) -> None:
    """Log, checkpoint and preview after a step, as the config's cadence says."""
    cfg, step = run.cfg, record["step"]
    if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"step {step}: the loss is {record['loss']} (lower lr, or set grad_clip)")
    run.log.write(record)
    progress.update(step, record["loss"])
    if run.procs.main and cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
        logger.info("step %d/%d  " + "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"),
                    step, cfg.steps)  # fmt: skip
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
        _save_checkpoint(run, step)
    if run.procs.main and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
        preview(run.task, run.ema, run.out_dir / "samples" / f"step-{step:07d}.png")


def preview(task: Task, ema: EMA | None, path: Path) -> None:
    """The task's preview with the EMA weights in the modules (eval mode), then back to training."""
    for m in task.modules.values():
        m.eval()
    with swapped(task.modules, ema.shadow if ema is not None else None):
        task.preview(path)
    for m in task.modules.values():
        m.train()
    logger.info("wrote %s", path)
