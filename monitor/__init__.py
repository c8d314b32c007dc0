"""misalignment-monitor: watch a vLLM model's residual stream and alert on watched concepts."""

__version__ = "0.1.0"
