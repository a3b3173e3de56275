"""Fixtures of the DCP tests."""

from __future__ import annotations

import random

import pytest


@pytest.fixture
def seed() -> int:
    """A fresh seed for a randomized test's choices and perturbed schedules, printed so that a failing
    run shows the seed it ran with."""
    chosen = random.randrange(2**32)
    print(f"seed {chosen}")
    return chosen
