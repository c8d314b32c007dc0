"""One validated YAML config for the monitor, plus detector packs."""

from monitor.config.load import (
    ConfigError,
    ConfigIssue,
    Detector,
    LoadedConfig,
    load_config,
    load_detectors,
    parse_detector,
    resolve_path,
)
from monitor.config.models import DetectorSpec, MonitorConfig

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "Detector",
    "DetectorSpec",
    "LoadedConfig",
    "MonitorConfig",
    "load_config",
    "load_detectors",
    "parse_detector",
    "resolve_path",
]
