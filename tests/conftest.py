"""Shared test set-up.

- Tiny models run on one thread (`one_thread`).
- Denormals are flushed: freshly initialised random networks produce denormal
  floats that slow CPU math two to three times, for minisd and the references
  alike, so both sides run with the same setting.
- A skipped test is a failed test. The references (diffusers, transformers,
  open_clip) are installed by the `[test]` extra; a parity test that skips
  because one is missing would hide a gap, so skips are turned into failures.
"""

import pytest
import torch

torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def one_thread():
    """Run a file's tiny models on one intra-op thread (restored afterwards): their tensors are
    too small to split, and on a busy 2-core machine OpenMP's thread barriers made each tiny
    forward ~40x slower (1.5 s instead of 40 ms). Files use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped tests count as failures in minisd (install the [test] extra): {report.longrepr}"
