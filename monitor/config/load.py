"""Load the monitor's YAML config and its detector packs, and check them against what they name.

Schema errors come from pydantic; on top of them we check what only the files can tell: that the
model has the tapped layers, SAEs and probes exist and read the tapped width, feature indices lie
inside their SAE, detectors name inputs that are configured. Every problem is reported at once,
each as `FILE: field.path: problem`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from monitor.config.models import DetectorSpec, FeatureInput, MonitorConfig, ProbeInput
from monitor.scoring.probe import LinearProbe, ProbeError, ProbeMetadata


@dataclass(frozen=True)
class ConfigIssue:
    file: Path
    loc: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.loc}: {self.message}" if self.loc else f"{self.file}: {self.message}"


class ConfigError(ValueError):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


@dataclass(frozen=True)
class SAEInfo:
    name: str
    layer: int
    d_in: int | None
    d_sae: int | None
    architecture: str | None
    path: Path | None


@dataclass(frozen=True)
class Detector:
    spec: DetectorSpec
    file: Path


@dataclass
class LoadedConfig:
    path: Path
    config: MonitorConfig
    detectors: list[Detector]
    num_layers: int | None = None
    d_model: int | None = None
    saes: dict[str, SAEInfo] = field(default_factory=dict)
    probes: dict[str, ProbeMetadata] = field(default_factory=dict)

    def resolve(self, p: str) -> Path:
        return resolve_path(self.path, p)


def resolve_path(config_file: Path, p: str) -> Path:
    """Paths in a config are relative to the config file's folder; `~` and $VARS are expanded."""
    q = Path(os.path.expandvars(p)).expanduser()
    return q if q.is_absolute() else (config_file.parent / q).resolve()


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; in a config that hides a mistake."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> object:
    if not path.is_file():
        raise ConfigError([ConfigIssue(path, "", "file not found")])
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (safe loader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([ConfigIssue(path, where, f"not valid YAML: {problem}")]) from e


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _pydantic_issues(path: Path, err: ValidationError) -> list[ConfigIssue]:
    issues = []
    for e in err.errors():
        # Tagged-union branches add their tag right after the list index; users never wrote it.
        raw = e["loc"]
        loc = tuple(p for i, p in enumerate(raw) if not (p in ("feature", "probe") and i > 0 and isinstance(raw[i - 1], int)))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see docs/configuration.md)"
        elif e["type"] == "missing":
            msg = "required but missing"
        elif "input" in e and e["type"] not in ("value_error",) and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        issues.append(ConfigIssue(path, _loc(loc), msg))
    return issues


def parse_detector(path: Path) -> DetectorSpec:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(path, "", "a detector file must be a mapping")])
    try:
        return DetectorSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_pydantic_issues(path, e)) from e


def detector_files(paths: list[Path]) -> tuple[list[Path], list[ConfigIssue]]:
    files, issues = [], []
    for p in paths:
        if p.is_dir():
            found = sorted(list(p.rglob("*.yaml")) + list(p.rglob("*.yml")))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            issues.append(ConfigIssue(p, "", "detector pack not found"))
    return files, issues


def load_detectors(paths: list[Path]) -> tuple[list[Detector], list[ConfigIssue]]:
    files, issues = detector_files(paths)
    detectors: list[Detector] = []
    for f in files:
        try:
            detectors.append(Detector(parse_detector(f), f))
        except ConfigError as e:
            issues.extend(e.issues)
    seen: dict[str, Path] = {}
    for d in detectors:
        if d.spec.name in seen:
            issues.append(ConfigIssue(d.file, "name", f"detector {d.spec.name!r} is also defined in {seen[d.spec.name]}"))
        seen.setdefault(d.spec.name, d.file)
    return detectors, issues


def load_config(path: str | Path, detectors: list[Path] | None = None) -> LoadedConfig:
    """Parse and check a monitor config; raise ConfigError listing every problem found.

    `detectors` replaces the config's detector packs (offline evaluation of another pack against
    the same SAEs and probes).
    """
    path = Path(path).resolve()
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(path, "", "the config must be a YAML mapping")])
    try:
        cfg = MonitorConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_pydantic_issues(path, e)) from e
    packs = [Path(p).resolve() for p in detectors] if detectors is not None else [resolve_path(path, p) for p in cfg.detectors]
    found, issues = load_detectors(packs)
    loaded = LoadedConfig(path=path, config=cfg, detectors=found)
    issues += _check_model(loaded)
    issues += _check_saes(loaded)
    issues += _check_probes(loaded)
    issues += _check_detectors(loaded)
    if not issues:  # the tensors, once every file and name is known to be there
        issues += check_sae_weights(loaded)
    issues += _check_sinks(loaded)
    issues += _check_transport(loaded)
    issues += _check_evidence(loaded)
    if issues:
        raise ConfigError(issues)
    return loaded


class _JsonFileError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _JsonFileError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(doc, dict):
        raise _JsonFileError(f"{path} must hold a JSON object, not {type(doc).__name__}")
    return doc


def _check_model(lc: LoadedConfig) -> list[ConfigIssue]:
    m, issues = lc.config.model, []
    lc.num_layers, lc.d_model = m.num_layers, m.d_model
    if m.path is not None:
        folder = lc.resolve(m.path)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            hint = " (run `monitor model prepare` for the demo model)" if not folder.exists() else ""
            return [ConfigIssue(lc.path, "model.path", f"{cfg_file} not found{hint}")]
        try:
            hf = _read_json(cfg_file)
        except _JsonFileError as e:
            return [ConfigIssue(lc.path, "model.path", str(e))]
        hf = hf.get("text_config", hf)  # multimodal configs nest the language model's
        for attr, key in (("num_layers", "num_hidden_layers"), ("d_model", "hidden_size")):
            value = hf.get(key)
            declared = getattr(m, attr)
            if declared is not None and value is not None and declared != value:
                issues.append(ConfigIssue(lc.path, f"model.{attr}", f"is {declared} but {cfg_file} says {key}={value}"))
            setattr(lc, attr, value if value is not None else declared)
    if lc.num_layers is not None:
        for i, tap in enumerate(lc.config.taps):
            if tap.layer >= lc.num_layers:
                issues.append(ConfigIssue(lc.path, f"taps[{i}].layer",
                                          f"layer {tap.layer} does not exist; the model has layers 0..{lc.num_layers - 1}"))
    return issues


def _check_saes(lc: LoadedConfig) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    tapped = set(lc.config.tapped_layers)
    for i, s in enumerate(lc.config.saes):
        where = f"saes[{i}]"
        if s.layer not in tapped:
            issues.append(ConfigIssue(lc.path, f"{where}.layer", f"layer {s.layer} is not tapped; add it to `taps`"))
        d_in = d_sae = arch = folder = None
        if s.path is not None:
            folder = lc.resolve(s.path)
            cfg_file = folder / "cfg.json"
            if not cfg_file.is_file():
                issues.append(ConfigIssue(lc.path, f"{where}.path", f"{cfg_file} not found (an sae-lens folder has cfg.json)"))
            else:
                try:
                    cfg = _read_json(cfg_file)
                except _JsonFileError as e:
                    issues.append(ConfigIssue(lc.path, f"{where}.path", str(e)))
                    cfg = {}
                d_in, d_sae, arch = cfg.get("d_in"), cfg.get("d_sae"), cfg.get("architecture", "standard")
                for key, value in (("d_in", d_in), ("d_sae", d_sae)):
                    if cfg and not (isinstance(value, int) and value > 0):
                        issues.append(ConfigIssue(lc.path, f"{where}.path", f"{cfg_file}: {key} must be a positive "
                                                  f"integer, is {value!r}"))
                        d_in = d_sae = None
                if not (folder / "sae_weights.safetensors").is_file():
                    issues.append(ConfigIssue(lc.path, f"{where}.path", f"{folder}/sae_weights.safetensors not found"))
                if lc.d_model is not None and d_in is not None and d_in != lc.d_model:
                    issues.append(ConfigIssue(lc.path, f"{where}.path",
                                              f"SAE reads width d_in={d_in} but the model's residual stream is {lc.d_model}"))
                if s.mode == "preact_proxy" and arch != "topk":
                    issues.append(ConfigIssue(lc.path, f"{where}.mode", f"preact_proxy is for TopK SAEs; this one is {arch}"))
        if s.labels is not None and not lc.resolve(s.labels).is_file():
            issues.append(ConfigIssue(lc.path, f"{where}.labels", f"{lc.resolve(s.labels)} not found"))
        lc.saes[s.name] = SAEInfo(s.name, s.layer, d_in, d_sae, arch, folder)
    return issues


def _check_probes(lc: LoadedConfig) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    tapped = set(lc.config.tapped_layers)
    for i, p in enumerate(lc.config.probes):
        where = f"probes[{i}].path"
        folder = lc.resolve(p.path)
        try:
            meta = LinearProbe.load(folder).meta  # the tensors too: shapes, finite values, positive std
        except ProbeError as e:
            issues.append(ConfigIssue(lc.path, where, str(e)))
            continue
        layers = meta.read_layers
        untapped = [la for la in layers if la not in tapped]
        if untapped:
            issues.append(ConfigIssue(lc.path, where, f"probe reads layer(s) {untapped}, not tapped; add them to `taps`"))
        if lc.d_model is not None and meta.d_in != lc.d_model * len(layers):
            issues.append(ConfigIssue(lc.path, where, f"probe width d_in={meta.d_in} differs from the tapped layers' "
                                      f"width {lc.d_model} x {len(layers)} layer(s) it reads"))
        lc.probes[p.name] = meta
    return issues


def _check_detectors(lc: LoadedConfig) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    for det in lc.detectors:
        for j, inp in enumerate(det.spec.inputs):
            where = f"inputs[{j}]"
            if isinstance(inp, FeatureInput):
                info = lc.saes.get(inp.sae)
                if info is None:
                    issues.append(ConfigIssue(det.file, f"{where}.sae",
                                              f"no SAE named {inp.sae!r} in {lc.path.name} (have: {sorted(lc.saes)})"))
                elif info.d_sae is not None and inp.feature >= info.d_sae:
                    issues.append(ConfigIssue(det.file, f"{where}.feature",
                                              f"feature {inp.feature} is outside SAE {inp.sae!r} (d_sae={info.d_sae})"))
            elif isinstance(inp, ProbeInput):
                meta = lc.probes.get(inp.probe)
                if meta is None:
                    if inp.probe not in {p.name for p in lc.config.probes}:
                        issues.append(ConfigIssue(det.file, f"{where}.probe",
                                                  f"no probe named {inp.probe!r} in {lc.path.name} (have: {sorted(lc.probes)})"))
                elif inp.output is not None and inp.output not in meta.outputs:
                    issues.append(ConfigIssue(det.file, f"{where}.output",
                                              f"probe {inp.probe!r} has outputs {meta.outputs}, not {inp.output!r}"))
    return issues


SAE_TENSORS = {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "b_dec": ("d_in",), "threshold": ("d_sae",)}


def check_sae_weights(lc: LoadedConfig) -> list[ConfigIssue]:
    """Each SAE's encoder as the detectors will read it: tensor shapes against cfg.json, floating dtypes, and
    finite values in every watched column (NaN there makes a detector silently never fire). Only the watched
    columns are read (safetensors slices), so a 65k-feature SAE costs milliseconds."""
    from safetensors import safe_open

    watched: dict[str, set[int]] = {}
    for det in lc.detectors:
        for inp in det.spec.inputs:
            if isinstance(inp, FeatureInput):
                watched.setdefault(inp.sae, set()).add(inp.feature)
    issues: list[ConfigIssue] = []
    for i, s in enumerate(lc.config.saes):
        info = lc.saes.get(s.name)
        if info is None or info.path is None or info.d_in is None or info.d_sae is None:
            continue
        path = info.path / "sae_weights.safetensors"
        where = f"saes[{i}].path"
        dims = {"d_in": info.d_in, "d_sae": info.d_sae}
        cols = sorted(watched.get(s.name, ()))
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                if "W_enc" not in names:
                    issues.append(ConfigIssue(lc.path, where, f"{path}: no W_enc tensor (has {sorted(names)})"))
                    continue
                for name, shape in SAE_TENSORS.items():
                    if name not in names:
                        continue
                    sl = f.get_slice(name)
                    want = [dims[d] for d in shape]
                    if list(sl.get_shape()) != want:
                        issues.append(ConfigIssue(lc.path, where, f"{path}: {name} has shape {sl.get_shape()}, cfg.json "
                                                  f"says {want} ({' x '.join(shape)})"))
                        continue
                    if not sl.get_dtype().startswith(("F", "BF")):
                        issues.append(ConfigIssue(lc.path, where, f"{path}: {name} is {sl.get_dtype()}, not floating"))
                        continue
                    t = sl[:, cols] if name == "W_enc" else (sl[cols] if shape == ("d_sae",) else sl[:])
                    if cols or name == "b_dec":
                        bad = ~torch.isfinite(t.float())
                        if bool(bad.any()):
                            at = f" at watched features {sorted({cols[j] for j in bad.nonzero()[:, -1].tolist()})}" \
                                if shape[-1] == "d_sae" else ""
                            issues.append(ConfigIssue(lc.path, where, f"{path}: {name} holds NaN or infinite values{at}"))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files
            issues.append(ConfigIssue(lc.path, where, f"{path} is not a readable safetensors file ({e})"))
    return issues


def tokenizer_dir(lc: LoadedConfig) -> Path | None:
    """Where the sidecar reads the model's tokenizer from (`text: flagged`, `read_reply`)."""
    ev, m = lc.config.evidence, lc.config.model
    folder = ev.tokenizer or m.path
    return lc.resolve(folder) if folder else None


def reads_reply(lc: LoadedConfig) -> bool:
    """Whether the sidecar decodes flagged requests' replies (and so needs the model's tokenizer)."""
    return lc.config.evidence.text == "flagged" or lc.config.evidence.read_reply


def _check_evidence(lc: LoadedConfig) -> list[ConfigIssue]:
    if not reads_reply(lc):
        return []
    why = "`text: flagged`" if lc.config.evidence.text == "flagged" else "`read_reply`"
    folder = tokenizer_dir(lc)
    if folder is None:
        return [ConfigIssue(lc.path, "evidence.tokenizer", f"{why} needs a tokenizer: set `evidence.tokenizer` "
                            "or `model.path`")]
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        return [ConfigIssue(lc.path, "evidence.tokenizer", f"{folder} holds no tokenizer (tokenizer.json)")]
    return []


RING_HEADER_BYTES, SLOT_HEADER_BYTES, META_BYTES, PAGE = 4096, 64, 64 * 1024, 4096


def ring_bytes(slots: int, slot_rows: int, d_model: int, layers: int, itemsize: int = 2) -> int:
    """A ring file's size (`monitor.transport.ring.RingSpec.file_bytes`, restated here: the config layer
    sits below the transport; tests/test_config.py keeps the two equal)."""
    raw = SLOT_HEADER_BYTES + META_BYTES + slot_rows * 4 + layers * slot_rows * d_model * itemsize
    return RING_HEADER_BYTES + slots * ((raw + PAGE - 1) // PAGE * PAGE)


def _check_transport(lc: LoadedConfig) -> list[ConfigIssue]:
    """Each vLLM worker reserves a whole ring in `transport.directory` at start: one that cannot fit turns
    the tap off (bfloat16 rows assumed; float32 models need twice as much). With detectors that act,
    vLLM's API server also listens there on a socket, whose path a Unix socket limits to 107 bytes."""
    t, folder = lc.config.transport, Path(lc.config.transport.directory)
    issues: list[ConfigIssue] = []
    if lc.config.taps and any(d.spec.action != "none" for d in lc.detectors):
        from monitor.transport.control import PID_MAX, ControlError, socket_path

        try:  # vLLM's API server listens there for the sidecar's verdicts: without it, no detector can act
            socket_path(folder, t.name, pid=PID_MAX)
        except ControlError as e:
            issues.append(ConfigIssue(lc.path, "transport.directory", str(e)))
    if lc.d_model is None or not lc.config.taps or not folder.is_dir():
        return issues
    need = ring_bytes(t.slots, t.slot_rows, lc.d_model, len(lc.config.taps))
    st = os.statvfs(folder)
    size = st.f_blocks * st.f_frsize
    if need > size:
        issues.append(ConfigIssue(lc.path, "transport.slots", f"a ring of {t.slots} slots x {t.slot_rows} rows at d_model "
                            f"{lc.d_model} needs {need / 2**20:.0f} MiB, more than all of {folder} "
                            f"({size / 2**20:.0f} MiB): lower transport.slots or transport.slot_rows, or enlarge "
                            f"{folder}"))
    return issues


def check_sidecar_paths(lc: LoadedConfig, files: dict[str, Path | None] | None = None) -> list[ConfigIssue]:
    """What the sidecar will write, checked for the user running this (`monitor check-config` runs it as
    the sidecar's user; `monitor sidecar` runs it before it starts): the spool while Kafka is unreachable,
    the rings it maps read-write, and output files named on its command line (`files`: flag -> path). Not
    part of `load_config`: vLLM's plugin loads the same config as another user and writes none of these."""
    issues: list[ConfigIssue] = []
    k = lc.config.sinks.kafka
    if k.enabled:
        why = _cannot_write(Path(k.spool_dir))
        if why:
            issues.append(ConfigIssue(lc.path, "sinks.kafka.spool_dir", f"{why}: the spool holds events while the "
                                      "broker is unreachable; give the sidecar's user a writable folder"))
    rings = Path(lc.config.transport.directory)
    if rings.is_dir() and not os.access(rings, os.R_OK | os.W_OK | os.X_OK):
        issues.append(ConfigIssue(lc.path, "transport.directory", f"{rings} is not readable and writable by uid "
                                  f"{os.getuid()}: the sidecar maps vLLM's rings there read-write (the chart shares "
                                  "it through fsGroup)"))
    for flag, path in (files or {}).items():
        why = None if path is None else _cannot_write(Path(path).parent, Path(path))
        if why:
            issues.append(ConfigIssue(Path(path), flag, why))
    ev = lc.config.evidence
    # find_spec, not an import: Presidio pulls spaCy (~5 s), and the sidecar builds it at start anyway.
    if ev.text == "flagged" and ev.recognize and importlib.util.find_spec("presidio_analyzer") is None:
        issues.append(ConfigIssue(lc.path, "evidence.recognize", "needs Microsoft Presidio, which is not installed "
                                  "here: pip install 'misalignment-monitor[redact]'"))
    return issues


def _cannot_write(folder: Path, file: Path | None = None) -> str | None:
    """Why this user cannot create files in `folder` (or, when it does not exist yet, in the nearest folder
    above it that does), or append to `file`; None if it can."""
    if file is not None and file.exists():
        return None if os.access(file, os.W_OK) else f"{file} is not writable by uid {os.getuid()}"
    at = folder
    while not at.exists() and at.parent != at:
        at = at.parent
    if not at.is_dir():
        return f"{at} is not a folder"
    if not os.access(at, os.W_OK | os.X_OK):
        return f"{at} is not writable by uid {os.getuid()}" + ("" if at == folder else f" (to make {folder})")
    return None


def credential_path(p: str) -> str:
    """A secret's path as written, with `~` and `$VAR` expanded (a mounted secret's folder often comes from
    the environment). An unset variable is an error, never a literal `$VAR` folder."""
    expanded = os.path.expandvars(os.path.expanduser(p))
    if "$" in expanded:
        raise ValueError(f"{p}: an environment variable in it is not set")
    return expanded


def _check_sinks(lc: LoadedConfig) -> list[ConfigIssue]:
    k = lc.config.sinks.kafka
    issues: list[ConfigIssue] = []
    if not k.enabled:
        return issues
    for key in ("sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(k, key)
        if not value:
            continue
        try:
            path = lc.resolve(credential_path(value))
        except ValueError as e:
            issues.append(ConfigIssue(lc.path, f"sinks.kafka.{key}", str(e)))
            continue
        if not path.is_file():
            issues.append(ConfigIssue(lc.path, f"sinks.kafka.{key}", f"{path} not found"))
    if k.sasl_password_env and k.sasl_password_env not in os.environ:
        issues.append(ConfigIssue(lc.path, "sinks.kafka.sasl_password_env", f"environment variable {k.sasl_password_env} is not set"))
    return issues
