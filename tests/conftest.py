"""Shared fixtures for the template tests: render with pytest-copie."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def render(copie):
    """Render one answer set with pytest-copie and return the project directory."""

    def _render(answers: dict) -> Path:
        result = copie.copy(extra_answers=answers)
        assert result.exception is None, f"rendering {answers} failed: {result.exception}"
        assert result.project_dir is not None
        return Path(result.project_dir)

    return _render
