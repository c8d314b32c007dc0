"""SAE folders in sae-lens's disk format, written without sae-lens (the GPU machine has none)."""

from __future__ import annotations

from pathlib import Path

import torch

from monitor.scoring.sae_file import SaeFileConfig, save_sae_folder

ARCHES = ("standard", "jumprelu", "gated", "topk")


def write_sae_folder(folder: Path, arch: str, d_in: int, d_sae: int, seed: int = 0, dtype: str = "float32",
                     **flags) -> Path:
    """A random SAE of `arch`; `flags`: normalize_activations, apply_b_dec_to_input, k,
    rescale_acts_by_decoder_norm."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    w = {"W_enc": randn(d_in, d_sae, scale=d_in**-0.5), "W_dec": randn(d_sae, d_in, scale=d_in**-0.5),
         "b_dec": randn(d_in, scale=0.3)}
    if arch == "gated":
        w |= {"b_gate": randn(d_sae, scale=0.3), "r_mag": randn(d_sae, scale=0.3), "b_mag": randn(d_sae, scale=0.3)}
    else:
        w["b_enc"] = randn(d_sae, scale=0.3)
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    cfg = SaeFileConfig(arch, d_in, d_sae, dtype, flags.get("normalize_activations", "none"),
                        flags.get("apply_b_dec_to_input", True), k=flags.get("k", 32) if arch == "topk" else None,
                        rescale_acts_by_decoder_norm=flags.get("rescale_acts_by_decoder_norm", False))
    return save_sae_folder(folder, cfg, w)
