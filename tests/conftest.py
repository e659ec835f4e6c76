"""Shared test set-up.

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped tests count as failures in minisd (install the [test] extra): {report.longrepr}"
