"""Scoring residual rows: watched SAE features, linear probes, and both fused per layer."""

from monitor.scoring.batched import BatchedScorer, LayerScorer
from monitor.scoring.probe import LinearProbe, ProbeError, ProbeMetadata
from monitor.scoring.watched import ScoringError, WatchedEncoder

__all__ = [
    "BatchedScorer",
    "LayerScorer",
    "LinearProbe",
    "ProbeError",
    "ProbeMetadata",
    "ScoringError",
    "WatchedEncoder",
]
