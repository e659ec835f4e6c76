"""`minisd generate --prompts FILE -o DIR`: batches, the index, resume after an interruption, and torchrun shares.

The reference for a resumed or distributed run is the same command run once, uninterrupted, in one process:
the images must be the same files with the same bytes (the same code on the same CPU and thread count).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from minisd import batch, cli, cli_generate
from minisd.metadata import Generation

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red square"]


def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# shapes\n" + "\n".join(PROMPTS[:3]) + "\n\n" + "\n".join(PROMPTS[3:]) + "\n")
    return path


def run(prompts: Path, out: Path, *extra) -> int:
    return cli.main(["generate", "--prompts", str(prompts), "-o", str(out), "--steps", "2", "--batch-size", "2",
                     "--device", "cpu", *extra])  # fmt: skip


def images(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".png"}


def index(folder: Path) -> list[dict]:
    text = (folder / batch.INDEX).read_text()
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.splitlines()]  # every line whole JSON


def test_prompt_file_index_and_per_prompt_settings(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(prompt_file(tmp_path), out, "--seed", "10") == 0
    names = [f"{k:05d}-{batch.slug(p)}.png" for k, p in enumerate(PROMPTS)]
    assert sorted(images(out)) == names
    records = index(out)
    assert [r["file"] for r in records] == names and [r["prompt"] for r in records] == PROMPTS
    assert [r["seed"] for r in records] == [10, 11, 12, 13, 14]  # per prompt: base seed + position
    assert all(r["settings"]["steps"] == 2 and r["time"] for r in records)
    # JSONL: per-prompt settings; a whole-run setting per prompt is refused, naming the line
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a red circle", "seed": 3, "steps": 1}\n{"prompt": "a blue square"}\n')
    assert run(jsonl, tmp_path / "j") == 0
    records = index(tmp_path / "j")
    assert [(r["seed"], r["settings"]["steps"]) for r in records] == [(3, 1), (1, 2)]
    jsonl.write_text('{"prompt": "a"}\n{"prompt": "b", "model": "other.safetensors"}\n')
    capsys.readouterr()
    assert run(jsonl, tmp_path / "k") == 1
    assert "p.jsonl:2: ['model'] are set for the whole run" in capsys.readouterr().err


@pytest.mark.reliability("command line", "a `--prompts` run interrupted (Ctrl-C) and started again",
                         "exit 130; the rerun skips the images written, makes the rest as an uninterrupted run "
                         "would, and the index has every image once, with no partial line")
def test_interrupted_run_resumes(tmp_path, monkeypatch):
    prompts = prompt_file(tmp_path)
    assert run(prompts, tmp_path / "whole") == 0
    calls, interrupt = [], [2]  # Ctrl-C in the second batch of the first run only
    real = cli_generate.run_batch

    def interrupted_second(jobs, models, callback):
        calls.append([j.path.name for j in jobs])
        if interrupt and len(calls) == interrupt[0]:
            interrupt.clear()
            raise KeyboardInterrupt
        return real(jobs, models, callback)

    monkeypatch.setattr(cli_generate, "run_batch", interrupted_second)
    out = tmp_path / "out"
    assert run(prompts, out) == 130
    assert [r["file"] for r in index(out)] == calls[0]  # the first batch is written and indexed
    calls.clear()
    assert run(prompts, out) == 0
    assert calls == [["00002-a-green-triangle.png", "00003-a-yellow-circle.png"], ["00004-a-red-square.png"]]
    assert images(out) == images(tmp_path / "whole")
    strip = [{k: v for k, v in r.items() if k != "time"} for r in index(out)]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in index(tmp_path / "whole")]
    calls.clear()
    assert run(prompts, out) == 0 and calls == []  # nothing left to do


def test_batches_and_shares_do_not_depend_on_the_world_size():
    base = Generation(prompt="", steps=2, width=32, height=32, guidance_scale=7.5)
    entries = [{"prompt": p} for p in PROMPTS] + [{"prompt": "x", "steps": 3}, {"prompt": "y", "steps": 3}]
    jobs = batch.jobs_for(entries, base, Path("out"))
    groups = batch.batches(jobs, 2)
    # cut where the settings change, and at the batch size
    assert [[j.path.name[:5] for j in b] for b in groups] == [["00000", "00001"], ["00002", "00003"], ["00004"],
                                                              ["00005", "00006"]]  # fmt: skip
    for world in (1, 2, 3, 5):
        shares = [batch.share(groups, r, world) for r in range(world)]
        assert sorted((b[0].path for s in shares for b in s)) == sorted(b[0].path for b in groups)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(tmp_path):
    """2 ranks on gloo (CPU) write the same files, byte for byte, as one process; rank 0 writes the index."""
    prompts = prompt_file(tmp_path)
    assert run(prompts, tmp_path / "one") == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "minisd", "generate", "--prompts", str(prompts),
            "-o", str(tmp_path / "two"), "--steps", "2", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert images(tmp_path / "two") == images(tmp_path / "one")
    assert [r["file"] for r in index(tmp_path / "two")] == [r["file"] for r in index(tmp_path / "one")]
    # each rank printed the files of its own share: rank 0 batches 0 and 2, rank 1 batch 1
    printed = sorted(Path(line).name for line in done.stdout.split())
    assert printed == sorted(images(tmp_path / "one"))


def test_each_output_path_is_one_write(monkeypatch):
    """Ranks under torchrun share one stdout pipe: a path and its newline must go out in one write (a
    write under PIPE_BUF is atomic), or two ranks' paths can run together on one line, as `print` on an
    unbuffered stdout did in CI (two writes: the text, then the newline)."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    cli_generate._print_line(Path("/out/00002-a-green-triangle.png"))
    assert writes == ["/out/00002-a-green-triangle.png\n"]
