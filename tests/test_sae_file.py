"""The sidecar's own reader of sae-lens's folder format equals sae-lens, and the sidecar needs no sae-lens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from monitor.scoring import ScoringError, WatchedEncoder
from monitor.scoring.sae_file import load_sae, load_sae_folder
from sae_folders import write_sae_folder
from test_scoring_parity import FEATURES, FLAG_SETS, make_sae, rows

ROOT = Path(__file__).resolve().parents[1]


def _flag_sets(arch):
    extra = [{"rescale_acts_by_decoder_norm": True}] if arch == "topk" else []
    return [(arch, f) for f in FLAG_SETS + extra]


CASES = [c for arch in ("standard", "jumprelu", "gated", "topk") for c in _flag_sets(arch)]


@pytest.mark.parametrize("arch,flags", CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_a_folder_sae_lens_wrote_reads_and_encodes_as_sae_lens_does(arch, flags, tmp_path):
    ref = make_sae(arch, tmp_path, **flags)  # saved by sae-lens and loaded back by it
    ours = load_sae_folder(tmp_path / arch)
    x = rows()
    torch.testing.assert_close(ours.encode(x), ref.encode(x), rtol=0, atol=0)  # same ops: equal, not close
    if arch != "topk":
        a = WatchedEncoder.from_sae(ours, FEATURES).encode(x)
        b = WatchedEncoder.from_sae(ref, FEATURES).encode(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated", "topk"])
def test_a_folder_written_without_sae_lens_is_read_by_sae_lens_alike(arch, tmp_path):
    """The GPU tests write their SAEs without sae-lens: those folders are sae-lens's format, not ours."""
    folder = write_sae_folder(tmp_path / arch, arch, 64, 512, seed=3, normalize_activations="layer_norm")
    x = rows()
    torch.testing.assert_close(load_sae_folder(folder).encode(x), SAE.load_from_disk(folder).encode(x), rtol=0, atol=0)


def test_bfloat16_weights_stay_bfloat16(tmp_path):
    folder = write_sae_folder(tmp_path / "bf", "jumprelu", 64, 256, dtype="bfloat16")
    ours, ref = load_sae_folder(folder), SAE.load_from_disk(folder)
    assert ours.W_enc.dtype == torch.bfloat16
    torch.testing.assert_close(ours.encode(rows()), ref.encode(rows()), rtol=0, atol=0)


def test_bad_folders_get_errors_naming_the_file_and_the_field(tmp_path):
    with pytest.raises(ScoringError, match="cfg.json: no such file"):
        load_sae_folder(tmp_path / "nothing")
    folder = write_sae_folder(tmp_path / "a", "jumprelu", 16, 32)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_sae"}))
    with pytest.raises(ScoringError, match="'d_sae' is missing"):
        load_sae_folder(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 64}))
    with pytest.raises(ScoringError, match=r"W_enc has shape \(16, 32\), cfg.json says \(16, 64\)"):
        load_sae_folder(folder)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ScoringError, match="cannot be read as safetensors"):
        load_sae_folder(folder)


def test_a_folder_only_sae_lens_reads_goes_to_sae_lens(tmp_path):
    """A folder whose config predates sae-lens 6 (it needs sae-lens's own conversion) still loads, through
    sae-lens; the same path serves architectures this reader does not (`UnreadableSae`)."""
    folder = write_sae_folder(tmp_path / "j", "jumprelu", 16, 32)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "metadata": {"sae_lens_version": "5.9.0"},
                                                 "sae_lens_version": "5.9.0"}))
    sae = load_sae(folder)
    assert isinstance(sae, SAE)  # an old config: sae-lens's own conversion


def test_the_sidecar_builds_the_demo_detectors_without_importing_sae_lens():
    code = ("import sys; from monitor.config.load import load_config; from monitor.detectors.runtime import "
            "build_detector_set; ds = build_detector_set(load_config('deploy/local/monitor.yaml'), 'cpu'); "
            "[c._encoder() for c in ds.context.values()]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sae_lens', 'transformer_lens', 'datasets')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
