"""Watched-feature scoring equals sae-lens's own encode, per architecture and config flag."""

from __future__ import annotations

import pytest
import torch
from sae_lens import (
    SAE,
    GatedSAEConfig,
    JumpReLUSAEConfig,
    StandardSAEConfig,
    TopKSAEConfig,
)

from monitor.scoring import BatchedScorer, LayerScorer, LinearProbe, ProbeMetadata, ScoringError, WatchedEncoder

D_IN, D_SAE, N = 64, 512, 200
FEATURES = [0, 3, 17, 100, 255, 511, 42]
CONFIGS = {"standard": StandardSAEConfig, "jumprelu": JumpReLUSAEConfig, "gated": GatedSAEConfig, "topk": TopKSAEConfig}


def make_sae(arch: str, tmp_path, dtype: str = "float32", **flags) -> SAE:
    """A random SAE of the given architecture, saved and loaded back the way users load one."""
    torch.manual_seed(hash((arch, dtype, tuple(sorted(flags.items())))) % 2**31)
    extra = {"k": 32} if arch == "topk" else {}
    sae = SAE.from_dict({**CONFIGS[arch](d_in=D_IN, d_sae=D_SAE, dtype=dtype, **extra, **flags).to_dict()})
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand_like(p) * 0.5)  # non-trivial per-feature thresholds
            else:
                p.copy_(torch.randn_like(p) * (0.3 if name.startswith("b") else 1.0 / D_IN**0.5))
    sae.save_model(tmp_path / arch)
    return SAE.load_from_disk(tmp_path / arch)


def rows(dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    # Residual streams have a large mean and outlier dims: a plain randn would hide folding errors.
    x = torch.randn(N, D_IN) * 2 + 0.5
    x[:, 5] *= 20
    return x.to(dtype)


def assert_matches(got: torch.Tensor, want: torch.Tensor, pre: torch.Tensor | None, thr, rtol, atol):
    """Equal to rounding; JumpReLU/gated outputs may only differ where the gate sits on the edge."""
    close = torch.isclose(got.float(), want.float(), rtol=rtol, atol=atol)
    if pre is not None:
        on_edge = (pre.float() - thr).abs() < 1e-4
        close |= on_edge
    bad = (~close).sum().item()
    assert bad == 0, f"{bad} of {close.numel()} values differ; max abs diff {(got.float() - want.float()).abs().max()}"


FLAG_SETS = [
    {},
    {"apply_b_dec_to_input": False},
    {"normalize_activations": "constant_norm_rescale"},
    {"normalize_activations": "layer_norm"},
    {"normalize_activations": "expected_average_only_in"},
    {"normalize_activations": "layer_norm", "apply_b_dec_to_input": False},
]


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
def test_exact_equals_sae_lens_encode(arch, flags, tmp_path):
    sae = make_sae(arch, tmp_path, **flags)
    x = rows()
    want = sae.encode(x)[:, FEATURES]
    enc = WatchedEncoder.from_sae(sae, FEATURES, mode="exact")
    got = enc.encode(x)
    assert got.shape == (N, len(FEATURES)) and got.dtype == torch.float32
    assert (want > 0).float().mean() > 0.05, "test SAE should have live watched features"
    pre = enc.hidden_pre(x) if arch != "standard" else None
    thr = enc.threshold if arch == "jumprelu" else 0.0
    if arch == "gated":  # the gate decides; compare its pre-activation to 0
        pre = enc.preprocess(x) @ enc.w_enc + enc.b_enc
    assert_matches(got, want, pre, thr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_exact_honours_sae_dtype(arch, tmp_path):
    sae = make_sae(arch, tmp_path, dtype="bfloat16")
    assert sae.dtype == torch.bfloat16
    x = rows(torch.float32)
    want = sae.encode(x)[:, FEATURES]
    got = WatchedEncoder.from_sae(sae, FEATURES).encode(x)
    assert got.dtype == torch.bfloat16
    # Same dtype, same operations: bf16 results agree to bf16 rounding of the matmul.
    enc = WatchedEncoder.from_sae(sae, FEATURES)
    pre = enc.preprocess(x) @ enc.w_enc + enc.b_enc
    thr = enc.threshold.float() if arch == "jumprelu" else 0.0
    close = torch.isclose(got.float(), want.float(), rtol=2e-2, atol=2e-2) | ((pre.float() - thr).abs() < 5e-2)
    assert close.all()


@pytest.mark.parametrize("flags", [{}, {"rescale_acts_by_decoder_norm": True}, {"normalize_activations": "layer_norm"}])
def test_topk_exact_and_proxy(flags, tmp_path):
    sae = make_sae("topk", tmp_path, **flags)
    x = rows()
    want = sae.encode(x)[:, FEATURES]
    exact = WatchedEncoder.from_sae(sae, FEATURES, mode="exact")
    torch.testing.assert_close(exact.encode(x), want)
    proxy = WatchedEncoder.from_sae(sae, FEATURES, mode="preact_proxy")
    # The proxy is the pre-activation TopK ranks on: where TopK kept a feature, they agree.
    p = proxy.encode(x)
    kept = want > 0
    torch.testing.assert_close(p[kept], want[kept], rtol=1e-5, atol=1e-5)
    # Per row, every watched feature TopK dropped ranks below every one it kept.
    lowest_kept = torch.where(kept, p, torch.inf).min(dim=1).values
    highest_dropped = torch.where(kept, -torch.inf, p).max(dim=1).values
    assert kept.any() and (highest_dropped <= lowest_kept).all()


def test_topk_needs_a_named_mode(tmp_path):
    sae = make_sae("topk", tmp_path)
    with pytest.raises(ScoringError, match="unknown mode"):
        WatchedEncoder.from_sae(sae, FEATURES, mode="fast")  # type: ignore[arg-type]


def test_columnwise_rejects_proxy_and_bad_indices(tmp_path):
    sae = make_sae("jumprelu", tmp_path)
    with pytest.raises(ScoringError, match="only for TopK"):
        WatchedEncoder.from_sae(sae, FEATURES, mode="preact_proxy")
    with pytest.raises(ScoringError, match=r"\[512, -1\] are outside the SAE \(d_sae=512\)"):
        WatchedEncoder.from_sae(sae, [1, 512, -1])
    with pytest.raises(ScoringError, match="width 63"):
        WatchedEncoder.from_sae(sae, [1]).encode(torch.randn(3, 63))


def random_probe(d_in=D_IN, k=1, standardize=True) -> LinearProbe:
    torch.manual_seed(7)
    meta = ProbeMetadata(name="p", concept="c", model="m", layer=1, d_in=d_in, outputs=[f"o{i}" for i in range(k)],
                         standardize=standardize)
    mean, std = (torch.randn(d_in), torch.rand(d_in) + 0.5) if standardize else (None, None)
    return LinearProbe(torch.randn(k, d_in) * 0.1, torch.randn(k), meta, mean, std)


def test_probe_roundtrip_and_logistic_output(tmp_path):
    probe = random_probe(k=2)
    probe.save(tmp_path / "p")
    loaded = LinearProbe.load(tmp_path / "p")
    x = rows()
    want = torch.sigmoid(((x - probe.mean) / probe.std) @ probe.weight.T + probe.bias)
    torch.testing.assert_close(loaded.encode(x), want)
    assert loaded.meta == probe.meta


def test_fused_layer_scorer_matches_each_head(tmp_path):
    """Several SAEs (every columnwise architecture, several normalisations) and probes in one pass."""
    heads = {
        "std": WatchedEncoder.from_sae(make_sae("standard", tmp_path), FEATURES),
        "jr_ln": WatchedEncoder.from_sae(make_sae("jumprelu", tmp_path, normalize_activations="layer_norm"), FEATURES),
        "gated_cnr": WatchedEncoder.from_sae(
            make_sae("gated", tmp_path, normalize_activations="constant_norm_rescale"), FEATURES[:3]
        ),
        "topk_proxy": WatchedEncoder.from_sae(make_sae("topk", tmp_path, rescale_acts_by_decoder_norm=True), FEATURES,
                                              mode="preact_proxy"),
        "topk_exact": WatchedEncoder.from_sae(make_sae("topk", tmp_path), FEATURES),
        "probe": random_probe(k=2),
        "probe_raw": random_probe(standardize=False),
    }
    scorer = LayerScorer(heads)
    assert scorer.weight.shape[1] == 7 + 7 + 6 + 7 + 2 + 1  # one matmul for all but the exact TopK head
    x = rows(torch.bfloat16)  # vLLM hands bf16 rows
    got = scorer.score(x)
    assert set(got) == set(heads)
    for name, head in heads.items():
        want = head.logits(x) if isinstance(head, LinearProbe) else head.encode(x).float()
        pre = None
        thr = 0.0
        if isinstance(head, WatchedEncoder) and head.architecture == "jumprelu":
            pre, thr = head.hidden_pre(x), head.threshold
        if isinstance(head, WatchedEncoder) and head.architecture == "gated":
            pre = head.preprocess(x) @ head.w_enc + head.b_enc
        assert_matches(got[name], want, pre, thr, rtol=1e-4, atol=1e-4)


def test_batched_scorer_across_layers(tmp_path):
    a = WatchedEncoder.from_sae(make_sae("standard", tmp_path), FEATURES)
    b = random_probe()
    scorer = BatchedScorer({3: {"a": a}, 7: {"b": b}})
    xa, xb = rows(), rows() * 0.5
    got = scorer.score({3: xa, 7: xb})
    torch.testing.assert_close(got["a"], a.encode(xa), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["b"], b.logits(xb), rtol=1e-4, atol=1e-4)
    with pytest.raises(ScoringError, match="unique"):
        BatchedScorer({3: {"a": a}, 7: {"a": b}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_exact_on_cuda(arch, tmp_path):
    sae = make_sae(arch, tmp_path)
    x = rows()
    want = sae.encode(x)[:, FEATURES]
    got = WatchedEncoder.from_sae(sae, FEATURES).to("cuda").encode(x.cuda()).cpu()
    enc = WatchedEncoder.from_sae(sae, FEATURES)
    pre = enc.preprocess(x) @ enc.w_enc + enc.b_enc if arch != "standard" else None
    thr = enc.threshold if arch == "jumprelu" else 0.0
    # TF32 off by default for matmul in torch; allow float32 rounding of a different kernel.
    assert_matches(got, want, pre, thr, rtol=1e-4, atol=1e-4)


def test_max_batch_rows_bounds_a_pass_without_changing_scores():
    """`scoring.max_batch_rows`: a slot larger than it is scored in chunks, with the same result."""
    torch.manual_seed(0)
    d = 24
    meta = ProbeMetadata(name="p", concept="c", model="m", layer=1, d_in=d)
    heads = {1: {"probe:p": LinearProbe(torch.randn(1, d), torch.randn(1), meta)}}
    x = torch.randn(10, d)
    whole = BatchedScorer(heads, "cpu", max_rows=4096).score({1: x})["probe:p"]
    chunked = BatchedScorer(heads, "cpu", max_rows=3).score({1: x})["probe:p"]
    assert chunked.shape == (10, 1) and torch.allclose(whole, chunked)
    with pytest.raises(ScoringError, match="max_rows must be at least 1"):
        BatchedScorer(heads, "cpu", max_rows=0)
