"""`model.GenerateRequest`, the record of `StableDiffusion.generate`'s keywords.

- It and generate's signature agree: the same keywords in the same order, with the same defaults and
  annotations (generate's signature is public API; the record is where the defaults are resolved).
- Creating one checks every argument that needs no model, before any model is touched.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from minisd.model import GenerateRequest, StableDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")


def test_record_and_generate_signature_agree():
    params = list(inspect.signature(StableDiffusion.generate).parameters.values())[1:]  # less self
    fields = dataclasses.fields(GenerateRequest)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields):
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert (p.default, p.annotation) == (default, f.type), p.name


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, r"steps: expected an integer >= 1, got 0"),
    ({"sampler": "nope"}, r"sampler: expected one of \("),
    ({"output": "png"}, r"output: expected one of \('pil', 'latent', 'tensor'\), got 'png'"),
    ({"guidance_scale": float("nan")}, r"guidance_scale: expected a finite number, got nan"),
    ({"schedule": "linear"}, r"schedule: expected a DiscreteSchedule or None, got 'linear'"),
])  # fmt: skip
def test_arguments_are_checked_on_creation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerateRequest("a cat", **kwargs)
