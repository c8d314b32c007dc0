"""The plugin's tap inside `torch.compile` and captured CUDA graphs, as vLLM runs it on a GPU.

vLLM compiles the model and captures one CUDA graph per padded batch size, then replays the graph
with fresh inputs every step: the tap's rows are right only if the op writes into the same buffers
on every replay and does nothing on the host. A toy decoder shaped like vLLM's (layers return
`(hidden, residual)`, the add deferred to the next layer) is armed with the plugin's own
`install_taps`, compiled, captured at several batch sizes and replayed; the tap buffers must then
hold exactly what an independent eager computation gives. Then the rows go the way the plugin sends
them on a GPU (`_GpuStager`: device staging, pinned host copy on a side stream, the publisher thread)
into a real ring, and the sidecar's reader gets them back.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from monitor.plugin.capture import _GpuStager, _Publisher
from monitor.plugin.tap import install_taps
from monitor.transport.meta import Segment
from monitor.transport.ring import RingReader, RingSpec, RingWriter

D, LAYERS, MAX_TOKENS = 64, 4, 128
TAPPED = [1, 2]
SHAPES = [8, 32, 128]  # padded batch sizes, as vLLM captures one graph per size


class ToyLayer(nn.Module):
    """A vLLM-style decoder block: takes (hidden, residual), returns (hidden, residual) with the add deferred."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        residual = hidden if residual is None else hidden + residual
        return self.mlp(self.norm(residual)), residual


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ToyLayer() for _ in range(LAYERS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return hidden + residual


class ToyCausalLM(nn.Module):
    """`model.layers` where `install_taps` looks for a vLLM model's decoder layers."""

    def __init__(self) -> None:
        super().__init__()
        self.model = ToyModel()

    def forward(self, x):
        return self.model(x)


def reference_rows(model: ToyCausalLM, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """hidden + residual after each tapped block, computed in plain eager PyTorch without the tap."""
    untapped = getattr(ToyLayer.forward, "__wrapped__", ToyLayer.forward)  # the forward before the tap's patch
    out, hidden, residual = {}, x, None
    for i, layer in enumerate(model.model.layers):
        hidden, residual = untapped(layer, hidden, residual)
        if i in TAPPED:
            out[i] = hidden + residual
    return out


def make_model() -> tuple[ToyCausalLM, dict[int, torch.Tensor]]:
    torch.manual_seed(0)
    model = ToyCausalLM().cuda().eval()
    buffers = install_taps(model, TAPPED, MAX_TOKENS, D, torch.float32, torch.device("cuda"))
    return model, buffers


@torch.no_grad()
def test_replayed_cuda_graphs_of_the_compiled_model_fill_the_tap_buffers_like_eager():
    model, buffers = make_model()
    compiled = torch.compile(model, fullgraph=True)
    checked = 0
    for size in SHAPES:
        static_in = torch.zeros(size, D, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compile, autotune) off the capture stream, as vLLM does
            for _ in range(2):
                compiled(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # A host sync inside the graph would make capture itself fail; the sync debug mode also refuses
        # any synchronising call made while capturing.
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                static_out = compiled(static_in)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for replay in range(3):
            x = torch.randn(size, D, device="cuda") * (1 + replay)
            want = reference_rows(model, x)
            static_in.copy_(x)
            for b in buffers.values():
                b.fill_(float("nan"))  # what the replay does not write stays NaN
            graph.replay()
            torch.cuda.synchronize()
            for layer in TAPPED:
                got = buffers[layer][:size]
                assert not got.isnan().any(), f"layer {layer}, batch {size}: the replay left rows unwritten"
                torch.testing.assert_close(got, want[layer], rtol=1e-4, atol=1e-4)
                checked += 1
            torch.testing.assert_close(static_out, model.model(x), rtol=1e-4, atol=1e-4)  # and the model's output
    assert checked == len(SHAPES) * 3 * len(TAPPED)


@torch.no_grad()
def test_the_plugins_gpu_path_delivers_replayed_rows_to_the_sidecars_reader():
    """Device staging -> pinned host memory on a side stream -> publisher thread -> ring -> reader: the rows
    the sidecar reads are the rows the graph wrote, for steps of several sizes, each attributed to its
    requests."""
    model, buffers = make_model()
    compiled = torch.compile(model, fullgraph=True)
    ordered = [buffers[layer] for layer in TAPPED]
    spec = RingSpec(slots=16, slot_rows=MAX_TOKENS, d_model=D, layers=tuple(TAPPED), dtype=torch.float32)
    shm = tempfile.TemporaryDirectory(dir="/dev/shm")  # where rings live in production (and can be page-locked)
    writer = RingWriter(Path(shm.name) / "gpu.ring", spec)
    reader = RingReader(writer.path, pin_memory=True)
    assert reader.registered
    stager = _GpuStager(len(TAPPED), MAX_TOKENS, D, torch.float32, torch.device("cuda"), _Publisher(writer))
    expected = []
    for step, n in enumerate([8, 32, 100, 128, 1]):
        x = torch.randn(n, D, device="cuda")
        compiled(x)  # eager-compiled call: the op writes buffers[:n]
        segments = [Segment(f"chatcmpl-r{step}a-0000abcd", f"chatcmpl-r{step}a", f"r{step}a", 0, 0, n // 2, n // 2, 0),
                    Segment(f"chatcmpl-r{step}b-0000abcd", f"chatcmpl-r{step}b", f"r{step}b", 0, 0, n - n // 2, n, n // 2)]
        segments = [s for s in segments if s.n]
        stager.submit(ordered, n, step + 1, segments, [], time.time(), np.arange(n, dtype=np.int32))
        deadline = time.time() + 10
        while len(stager.free) < 2 and time.time() < deadline:  # published: the next step would not be dropped
            time.sleep(0.001)
        expected.append((n, {layer: t.cpu() for layer, t in reference_rows(model, x).items()}, segments))
    got = []
    deadline = time.time() + 30
    while len(got) < len(expected) and time.time() < deadline:
        got += [(s.step, [r.clone() for r in s.rows], s.meta.segments) for s in reader.poll(16, reuse=True)]
        time.sleep(0.01)
    assert [g[0] for g in got] == [1, 2, 3, 4, 5]
    for (n, want, segments), (_, rows, segs) in zip(expected, got):
        assert list(segs) == segments
        for li, layer in enumerate(TAPPED):
            assert rows[li].shape == (n, D)
            torch.testing.assert_close(rows[li], want[layer], rtol=1e-4, atol=1e-4)
    assert writer.counters()["dropped_slots"] == 0
    reader.close()
    writer.close()
    shm.cleanup()
