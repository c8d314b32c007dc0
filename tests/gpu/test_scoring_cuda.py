"""Scoring on CUDA equals scoring on the CPU, for every SAE architecture and probe kind the scorer serves.

SAEs are written in sae-lens's folder format and read with the sidecar's own reader (`sae_file`), as
a sidecar reads them; `tests/test_sae_file.py` pins that reader to sae-lens on the CPU. Matrix products
on a GPU sum in another order (and TF32 stays off, torch's default for float32), so values agree to
float32 rounding; a JumpReLU or gated feature may differ only where its pre-activation sits on the
threshold's edge, where either answer is right.
"""

from __future__ import annotations

import pytest
import torch
from sae_folders import ARCHES, write_sae_folder

from monitor.scoring import BatchedScorer, LayerScorer, LinearProbe, ProbeMetadata, WatchedEncoder
from monitor.scoring.sae_file import load_sae_folder

D_IN, D_SAE, N = 256, 2048, 600
FEATURES = [0, 3, 17, 100, 255, 511, 1024, 2047]
FLAGS = [{}, {"apply_b_dec_to_input": False}, {"normalize_activations": "constant_norm_rescale"},
         {"normalize_activations": "layer_norm"}]


def rows(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g) * 2 + 0.5  # a large mean and an outlier dimension, as residuals have
    x[:, 5] *= 20
    return x.to(dtype)


def close_or_on_edge(got: torch.Tensor, want: torch.Tensor, pre: torch.Tensor | None, edge, tol: float) -> None:
    ok = torch.isclose(got.float().cpu(), want.float(), rtol=tol, atol=tol)
    if pre is not None:
        ok |= (pre.float() - edge).abs() < 1e-3
    bad = int((~ok).sum())
    assert bad == 0, f"{bad} of {ok.numel()} values differ; max diff {(got.float().cpu() - want.float()).abs().max()}"


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
@pytest.mark.parametrize("arch", ARCHES)
def test_watched_features_and_the_full_encode_on_cuda_equal_the_cpu(arch, flags, tmp_path):
    sae = load_sae_folder(write_sae_folder(tmp_path / arch, arch, D_IN, D_SAE, seed=7, **flags))
    x = rows()
    # The full encode (incident context, TopK in exact mode).
    full_cpu = sae.encode(x)
    full_gpu = sae.to("cuda").encode(x.cuda())
    hidden = sae.process_sae_in(x) @ sae.W_enc + (sae.b_enc if sae.b_enc is not None else sae.b_gate)
    edge = sae.threshold if arch == "jumprelu" else 0.0
    if arch == "topk":  # which k features win may differ on ties of rounding: compare the winners' values
        assert (full_gpu.cpu() != 0).sum(1).le(32).all()
        torch.testing.assert_close(full_gpu.cpu().sort(1).values[:, -8:], full_cpu.sort(1).values[:, -8:],
                                   rtol=1e-4, atol=1e-4)
    else:
        close_or_on_edge(full_gpu, full_cpu, hidden, edge, 1e-4)
    mode = "preact_proxy" if arch == "topk" else "exact"
    cpu = WatchedEncoder.from_sae(sae, FEATURES, mode=mode)
    gpu = cpu.to("cuda")
    want = cpu.encode(x)
    assert (want != 0).float().mean() > 0.02, "the test SAE should have live watched features"
    close_or_on_edge(gpu.encode(x.cuda()), want, hidden[:, FEATURES], edge if arch != "jumprelu" else
                     sae.threshold[FEATURES], 1e-4)
    # The fused scorer (what the sidecar runs), CUDA against CPU.
    fused_cpu = LayerScorer({"s": cpu}, "cpu").score(x)["s"]
    fused_gpu = LayerScorer({"s": cpu}, "cuda").score(x)["s"]
    close_or_on_edge(fused_gpu, fused_cpu, hidden[:, FEATURES], edge if arch != "jumprelu" else
                     sae.threshold[FEATURES], 1e-3)


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probes_and_a_whole_layer_on_cuda_equal_the_cpu(standardize, dtype, tmp_path):
    g = torch.Generator().manual_seed(3)
    meta = ProbeMetadata(name="p", concept="c", model="m", layer=4, d_in=D_IN, outputs=["a", "b"],
                         standardize=standardize)
    extra = dict(mean=torch.randn(D_IN, generator=g), std=torch.rand(D_IN, generator=g) + 0.5) if standardize else {}
    probe = LinearProbe(torch.randn(2, D_IN, generator=g) * D_IN**-0.5, torch.randn(2, generator=g), meta, **extra)
    sae = load_sae_folder(write_sae_folder(tmp_path / "j", "jumprelu", D_IN, D_SAE, seed=9))
    heads = {4: {"probe:p": probe, "sae:j": WatchedEncoder.from_sae(sae, FEATURES)}}
    x = rows(dtype)
    cpu = BatchedScorer(heads, "cpu").score({4: x})
    gpu = BatchedScorer(heads, "cuda", max_rows=256).score({4: x.cuda()})  # in chunks, as a big slot is
    torch.testing.assert_close(gpu["probe:p"].cpu(), cpu["probe:p"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gpu["probe:p"].cpu(), probe.logits(x.float()), rtol=1e-3, atol=1e-3)
    pre = sae.process_sae_in(x.float()) @ sae.W_enc[:, FEATURES] + sae.b_enc[FEATURES]
    close_or_on_edge(gpu["sae:j"], cpu["sae:j"], pre, sae.threshold[FEATURES], 1e-3)
