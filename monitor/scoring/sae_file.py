"""Read an SAE folder in sae-lens's disk format without importing sae-lens.

A sidecar needs an SAE's weights and the few config fields that change `encode`; sae-lens brings
those plus a training stack (transformer-lens, datasets, pandas, pyarrow, wandb...): 79
distributions and ~7 s of imports (`docs/deploy.md`, "The sidecar's dependencies"). So the sidecar
reads the folder itself, for the architectures the scorer serves, and keeps sae-lens for what only
it can do: pretrained releases from a hub (`SaeSpec.release`), folders in an architecture or a
pre-6.0 config this reader does not know, and the offline tools that train SAEs.

The format (sae-lens 6, `SAE.save_model` / `SAE.load_from_disk`):

    cfg.json                  architecture, d_in, d_sae, dtype, normalize_activations,
                              apply_b_dec_to_input, reshape_activations (+ k, rescale_acts_by_decoder_norm)
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec (+ threshold or
                              log_threshold for jumprelu; b_gate, r_mag, b_mag for gated)

`encode` mirrors each architecture's `encode` in sae-lens 6.54 (op for op, so results are equal, not
merely close); `tests/test_sae_file.py` pins that against sae-lens for every architecture and flag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from monitor.scoring.watched import Preprocess, ScoringError, preprocess_of

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu", "gated", "topk")
WRITTEN_AS = "6.54.12"  # the sae-lens release whose format and encode this module mirrors
_NEEDS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec"),  # + threshold (or log_threshold)
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "torch.float32": torch.float32, "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16,
           "torch.float64": torch.float64}
_NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm", "covariance_whitening")


class UnreadableSae(ScoringError):
    """A folder this reader does not serve, but sae-lens might (another architecture, an old config)."""


@dataclass
class SaeFileConfig:
    """The config fields `encode` depends on, named as sae-lens names them."""

    arch: str
    d_in: int
    d_sae: int
    dtype: str
    normalize_activations: str = "none"
    apply_b_dec_to_input: bool = True
    reshape_activations: str = "none"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False

    def architecture(self) -> str:  # a method, as on sae-lens's configs (`WatchedEncoder` calls it)
        return self.arch


class SaeFile:
    """The weights of one SAE and its `encode`, with the attributes `WatchedEncoder.from_sae` reads."""

    def __init__(self, cfg: SaeFileConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.dtype = _DTYPES[cfg.dtype]
        self.W_enc = weights["W_enc"]
        self.W_dec = weights["W_dec"]
        self.b_dec = weights["b_dec"]
        self.b_enc = weights.get("b_enc")
        self.threshold = weights.get("threshold")
        self.b_gate, self.r_mag, self.b_mag = weights.get("b_gate"), weights.get("r_mag"), weights.get("b_mag")
        self._preprocess: Preprocess | None = None

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("W_enc", "W_dec", "b_dec", "b_enc", "threshold", "b_gate", "r_mag", "b_mag")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, device: torch.device | str) -> "SaeFile":
        return SaeFile(self.cfg, {n: t.to(device) for n, t in self._tensors().items()})

    def eval(self) -> "SaeFile":  # what callers of an nn.Module expect; nothing here trains
        return self

    def process_sae_in(self, x: torch.Tensor) -> torch.Tensor:
        # The watched-feature scorer's own mirror of sae-lens's input processing, not a second copy of it.
        if self._preprocess is None:
            self._preprocess = preprocess_of(self)
        return self._preprocess(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae] feature activations, as sae-lens's `encode` of this architecture."""
        sae_in = self.process_sae_in(x)
        arch = self.cfg.arch
        if arch == "gated":
            active = (sae_in @ self.W_enc + self.b_gate > 0).to(self.dtype)
            return active * torch.relu(sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        pre = sae_in @ self.W_enc + self.b_enc
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if arch == "topk":
            if self.cfg.rescale_acts_by_decoder_norm:
                pre = pre * self.W_dec.norm(dim=-1)
            values, indices = torch.topk(pre, k=self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        return torch.relu(pre)


def read_config(folder: Path) -> SaeFileConfig:
    path = folder / CFG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScoringError(f"{path}: no such file (an SAE folder in sae-lens's format holds {CFG_FILE} and "
                           f"{WEIGHTS_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScoringError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ScoringError(f"{path}: must hold a JSON object")
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    major = str(version or "").split(".")[0]
    if not major.isdigit() or int(major) < 6:
        raise UnreadableSae(f"{path}: written by sae-lens {version or 'before 6.0'}; its config needs sae-lens's "
                            "own conversion")
    arch = raw.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise UnreadableSae(f"{path}: architecture {arch!r} is read by sae-lens only (this reader serves "
                            f"{', '.join(ARCHITECTURES)})")
    try:
        cfg = SaeFileConfig(
            arch=arch, d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), dtype=str(raw.get("dtype", "float32")),
            normalize_activations=str(raw.get("normalize_activations") or "none"),
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            reshape_activations=str(raw.get("reshape_activations") or "none"),
            k=None if raw.get("k") is None else int(raw["k"]),
            rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)))
    except KeyError as e:
        raise ScoringError(f"{path}: the field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise ScoringError(f"{path}: a field has the wrong type ({e})") from None
    if cfg.dtype not in _DTYPES:
        raise ScoringError(f"{path}: dtype {cfg.dtype!r} is not one of {sorted(set(_DTYPES) - {k for k in _DTYPES if '.' in k})}")
    if cfg.normalize_activations not in _NORMALIZATIONS:
        raise ScoringError(f"{path}: normalize_activations {cfg.normalize_activations!r} is not one of {_NORMALIZATIONS}")
    if cfg.arch == "topk" and (cfg.k is None or not 0 < cfg.k <= cfg.d_sae):
        raise ScoringError(f"{path}: a topk SAE needs k between 1 and d_sae={cfg.d_sae}, has {cfg.k}")
    return cfg


def load_sae_folder(folder: str | Path, device: str | torch.device = "cpu") -> SaeFile:
    """Read `folder` (sae-lens's format). Raises UnreadableSae for a folder only sae-lens can read, and
    ScoringError, naming the file and field, for a folder nobody can."""
    folder = Path(folder)
    cfg = read_config(folder)
    path = folder / WEIGHTS_FILE
    dtype = _DTYPES[cfg.dtype]
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            weights = {k: f.get_tensor(k).to(dtype) for k in f.keys()}  # noqa: SIM118 - not a dict
    except FileNotFoundError:
        raise ScoringError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise ScoringError(f"{path}: cannot be read as safetensors ({e})") from None
    if "log_threshold" in weights:  # older jumprelu checkpoints, converted as sae-lens converts them
        weights["threshold"] = torch.exp(weights.pop("log_threshold")).contiguous()
    weights.pop("scaling_factor", None)  # a decode-side factor: encode never reads it
    needs = _NEEDS[cfg.arch] + (("threshold",) if cfg.arch == "jumprelu" else ())
    missing = [n for n in needs if n not in weights]
    if missing:
        raise ScoringError(f"{path}: a {cfg.arch} SAE needs the tensors {missing}, which are missing")
    d_in = cfg.d_in  # hook_z SAEs too: their d_in is the flattened heads' width
    expected = {"W_enc": (d_in, cfg.d_sae), "W_dec": (cfg.d_sae, d_in), "b_dec": (d_in,)}
    expected |= {n: (cfg.d_sae,) for n in ("b_enc", "threshold", "b_gate", "r_mag", "b_mag") if n in needs}
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ScoringError(f"{path}: {name} has shape {tuple(weights[name].shape)}, {CFG_FILE} says {shape} "
                               f"(d_in {cfg.d_in}, d_sae {cfg.d_sae})")
    # The per-feature vectors are checked here; the matrices' watched columns where they are taken
    # (`WatchedEncoder.from_sae`): a whole 65k x 4096 bfloat16 matrix takes seconds to check on a CPU.
    for name in needs:
        if weights[name].ndim == 1 and not bool(torch.isfinite(weights[name]).all()):
            raise ScoringError(f"{path}: {name} holds NaN or infinite values")
    return SaeFile(cfg, weights)


def save_sae_folder(folder: str | Path, cfg: SaeFileConfig, weights: dict[str, torch.Tensor]) -> Path:
    """Write an SAE as `SAE.save_model` does (what `load_sae_folder` and sae-lens both read): for tools and
    tests that make SAEs where sae-lens is not installed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"architecture": cfg.arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
           "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": cfg.normalize_activations,
           "reshape_activations": cfg.reshape_activations, "metadata": {"sae_lens_version": WRITTEN_AS}}
    if cfg.arch == "topk":
        doc |= {"k": cfg.k, "rescale_acts_by_decoder_norm": cfg.rescale_acts_by_decoder_norm}
    dtype = _DTYPES[cfg.dtype]
    save_file({k: v.detach().to(dtype).contiguous() for k, v in weights.items()}, str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(doc))
    return folder


def load_sae(folder: str | Path | None = None, release: str | None = None, sae_id: str | None = None):
    """An SAE for the sidecar: a folder through this reader (sae-lens's own loader only for a folder this
    reader does not serve), a pretrained release through sae-lens."""
    if folder is not None:
        try:
            return load_sae_folder(folder)
        except UnreadableSae as e:
            return _with_sae_lens(str(e), lambda SAE: SAE.load_from_disk(str(folder)))
    return _with_sae_lens(f"release {release!r} / {sae_id!r} is a pretrained release",
                          lambda SAE: SAE.from_pretrained(release, sae_id))


def _with_sae_lens(why: str, load):
    try:
        from sae_lens import SAE
    except ImportError:
        raise ScoringError(f"{why}: that needs sae-lens, which is not installed here (pip install "
                           "'misalignment-monitor[saelens]', or save the SAE with sae-lens 6 as a folder)") from None
    return load(SAE)

