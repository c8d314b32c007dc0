"""The tap: a custom op inside vLLM's compiled graph that copies a layer's residual stream out.

vLLM compiles the model once (Dynamo + Inductor, and CUDA graphs on GPU) and drops guards, so a
PyTorch forward hook added after compilation never runs, and Python inside the graph is frozen at
trace time. The tap is therefore an opaque custom op, placed by a class-level patch of the decoder
layer's `forward` before the first trace, that writes `hidden + residual` into a persistent buffer
allocated once. A fixed address is what makes CUDA-graph replays write fresh rows each step; the op
does no allocation, no host sync and no data-dependent Python.

vLLM decoder layers return `(hidden, residual)` and defer the add into the next layer's fused norm,
which then overwrites both in place: the op copies, never keeps a view. `hidden + residual` of block L
equals Hugging Face's `hidden_states[L + 1]`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("monitor.plugin")

OP_NAMESPACE = "misalignment_monitor"
_BUFFER_ATTR = "_misalignment_monitor_tap"
_PATCHED_ATTR = "_misalignment_monitor_patched"


@torch.library.custom_op(f"{OP_NAMESPACE}::tap_residual", mutates_args=("out",))
def tap_residual(hidden: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> None:
    """out[:n] = hidden + residual, for the n rows of this step (the rest of `out` is untouched)."""
    n = hidden.shape[0]
    torch.add(hidden, residual, out=out[:n])


@tap_residual.register_fake
def _tap_residual_fake(hidden: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> None:
    return None


def _patch_layer_class(cls: type[nn.Module]) -> None:
    if getattr(cls, _PATCHED_ATTR, False):
        return
    original = cls.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        # A plain attribute read: at trace time it is a constant per layer instance, so only
        # tapped layers get the op in the graph and untapped ones compile exactly as before.
        buf = self.__dict__.get(_BUFFER_ATTR)
        if buf is not None and isinstance(out, tuple) and len(out) == 2 and out[1] is not None:
            torch.ops.misalignment_monitor.tap_residual(out[0], out[1], buf)
        return out

    forward.__wrapped__ = original  # type: ignore[attr-defined]
    cls.forward = forward
    setattr(cls, _PATCHED_ATTR, True)
    log.info("patched %s.forward for the residual tap", cls.__qualname__)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list: `model.model.layers` in vLLM's decoder-only models."""
    for path in ("model.layers", "language_model.model.layers", "model.language_model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__}; the tap supports decoder-only models")


def install_taps(model: nn.Module, layers: list[int], max_tokens: int, d_model: int, dtype: torch.dtype,
                 device: torch.device) -> dict[int, torch.Tensor]:
    """Allocate one persistent [max_tokens, d_model] buffer per tapped layer and arm the layers.

    Layers outside this rank's pipeline stage are skipped (another rank taps them).
    """
    decoder_layers = find_decoder_layers(model)
    buffers: dict[int, torch.Tensor] = {}
    for layer in layers:
        if layer >= len(decoder_layers):
            raise ValueError(f"tapped layer {layer} does not exist; the model has {len(decoder_layers)} layers")
        module = decoder_layers[layer]
        if type(module).__name__ == "PPMissingLayer":
            continue
        _patch_layer_class(type(module))
        buf = torch.zeros(max_tokens, d_model, dtype=dtype, device=device)
        module.__dict__[_BUFFER_ATTR] = buf
        buffers[layer] = buf
    return buffers
