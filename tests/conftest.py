"""Shared fixtures for the template tests; what they do lives in rendering.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from rendering import render_with_copie


@pytest.fixture
def render(copie) -> Callable[[dict], Path]:
    """Render one answer set with pytest-copie and return the project directory."""
    return lambda answers: render_with_copie(copie, answers)
