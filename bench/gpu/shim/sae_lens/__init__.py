"""A stand-in for sae-lens, for the baseline's side of bench/gpu/run.sh only.

Sidecars before the package read SAE folders itself imported `sae_lens.SAE.load_from_disk`; a GPU
machine without a registry has no sae-lens. This serves that one call with the package's own reader
(`monitor/scoring/sae_file.py` of this checkout, loaded by path: the baseline's `monitor` lacks it),
which `tests/test_sae_file.py` proves equal to sae-lens. run.sh puts it on the path only where sae-lens
is missing.
"""

import importlib.util
import sys
from pathlib import Path

_path = Path(__file__).resolve().parents[4] / "monitor" / "scoring" / "sae_file.py"
_spec = importlib.util.spec_from_file_location("_mm_sae_file", _path)
_sae_file = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _sae_file  # dataclasses look their module up there
_spec.loader.exec_module(_sae_file)


class SAE:
    @staticmethod
    def load_from_disk(path, device="cpu", **_):
        return _sae_file.load_sae_folder(path, device)
