"""Fixtures of the harness tests."""

from __future__ import annotations

import pytest

import encoder_fusion.benchmarks.run.prepare
from encoder_fusion.encoders import Encoder


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if an image is loaded or an encoder runs: what a check at start must prevent."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before every setting was checked")

    monkeypatch.setattr(encoder_fusion.benchmarks.run.prepare, "load_split", forbidden)
    monkeypatch.setattr(Encoder, "forward_tokens", forbidden)
