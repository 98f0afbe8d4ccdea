"""Shared fixtures of the test suite (the helpers tests import live in ``helpers.py``).

* ``seeded`` (autouse): every test starts from the same torch / random / numpy state.
* ``gen``: a seeded CPU generator.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import SEED


@pytest.fixture(autouse=True)
def seeded() -> int:
    """Seed torch, random and numpy before every test; the value is returned for tests that need it."""
    torch.manual_seed(SEED)
    random.seed(SEED)
    try:
        import numpy as np

        np.random.seed(SEED)
    except ImportError:  # pragma: no cover
        pass
    return SEED


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator for tests that draw inputs explicitly."""
    return torch.Generator().manual_seed(SEED)
