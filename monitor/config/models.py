"""The monitor's configuration: one YAML file, plus detector packs (one YAML per detector).

Every field has a default documented here; `docs/configuration.md` is generated from these models
(`python -m monitor.config.reference`), and a test keeps the two in sync.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from monitor.provenance import Calibration

NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class Strict(BaseModel):
    # Unknown keys are errors: a misspelt key would otherwise silently fall back to a default. NaN and
    # infinities are errors too: a threshold of .nan compares false with every score (a detector that can
    # never fire), and one of .inf is the same thing said differently.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSection(Strict):
    """The served model; its folder tells the checker how many layers and how wide."""

    name: str = Field(
        "smollm2-135m-instruct",
        description="Served model name; becomes the `model_name` label, equal to vLLM's so PromQL can join.",
    )
    path: str | None = Field(
        None,
        description="Hugging Face model folder (config.json). Used to check layers and widths; "
        "relative paths are resolved against the config file.",
    )
    num_layers: int | None = Field(None, gt=0, description="Decoder layers, when `path` is not given.")
    d_model: int | None = Field(None, gt=0, description="Residual stream width, when `path` is not given.")


class Tap(Strict):
    """One tapped layer. The tap copies the residual stream after the block."""

    layer: int = Field(ge=0, description="Decoder block whose output residual stream is tapped (HF hidden_states[layer+1]).")
    hook: Literal["resid_post"] = Field("resid_post", description="Where in the block; only the residual stream after it.")


class SAESource(Strict):
    """A sparse autoencoder whose watched features detectors may use."""

    name: str = Field(pattern=NAME_RE, description="Name detectors use to refer to this SAE.")
    layer: int = Field(ge=0, description="Tapped layer the SAE reads; must be listed in `taps`.")
    path: str | None = Field(None, description="sae-lens disk folder (cfg.json + sae_weights.safetensors).")
    release: str | None = Field(None, description="sae-lens pretrained release (needs hub access), with `sae_id`.")
    sae_id: str | None = Field(None, description="SAE id within `release`.")
    mode: Literal["exact", "preact_proxy"] = Field(
        "exact", description="`preact_proxy` scores TopK SAEs from their watched columns' pre-activations (a proxy)."
    )
    labels: str | None = Field(None, description="Feature label file (JSON) with explanations shown in alerts.")

    @model_validator(mode="after")
    def _one_source(self) -> "SAESource":
        if (self.path is None) == (self.release is None):
            raise ValueError("give either `path` or `release` + `sae_id`, not both or neither")
        if self.release is not None and self.sae_id is None:
            raise ValueError("`release` needs `sae_id`")
        return self


class ProbeSource(Strict):
    """A linear probe folder (see docs/probe-format.md)."""

    name: str = Field(pattern=NAME_RE, description="Name detectors use to refer to this probe.")
    path: str = Field(description="Probe folder (probe.json + probe.safetensors); its layer comes from probe.json.")


class Scoring(Strict):
    """Where and how the sidecar scores rows."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when available, else CPU.")
    max_batch_rows: int = Field(4096, gt=0, description="Rows scored per pass; bounds the sidecar's memory per step.")


class SamplingRule(Strict):
    """Requests carrying `header` with one of `values` are always scored."""

    header: str = Field(pattern=r"^[A-Za-z0-9-]+$", description="HTTP request header, e.g. `X-Tenant-Id`.")
    values: list[str] = Field(min_length=1, description="Header values whose requests are always scored.")


class Sampling(Strict):
    """Which requests the sidecar scores: all by default. A request is scored whole or not at all."""

    fraction: float = Field(1.0, gt=0, le=1, description="Share of requests scored, chosen by a hash of the "
                            "request id: the same id is always chosen (or not), by every sidecar.")
    always: list[SamplingRule] = Field(default_factory=list, description="Requests always scored, whatever "
                                       "`fraction` says (the vLLM middleware checks their headers).")
    max_requests: int = Field(16384, ge=1, description="Requests tracked at once; a new request beyond it is not "
                              "scored, and counted (`misalignment_monitor_requests_not_scored_total{reason=\"over_limit\"}`).")


class Transport(Strict):
    """The shared-memory rings between the vLLM plugin and the sidecar."""

    directory: str = Field("/dev/shm", description="Where the ring files live; shared by vLLM and the sidecar.")
    name: str = Field("misalignment-monitor", pattern=NAME_RE, description="Ring file prefix (one ring per producer).")
    slots: int = Field(64, ge=2, le=65536, description="Slots in each ring.")
    slot_rows: int = Field(512, ge=1, description="Residual rows per slot (per tapped layer); a step with more spans slots.")
    overflow: Literal["drop_newest", "overwrite_oldest"] = Field(
        "drop_newest", description="What the producer does when the ring is full. It never waits; either way it counts."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Per-request state is released after this long without rows or a finish."
    )
    file_mode: Literal["0600", "0660"] = Field(
        "0600", description="Permissions of the ring and pinned-request files. 0600: vLLM and the sidecar run as "
        "one uid; 0660: they share a group instead (the chart's fsGroup), and nobody else may read them.")


class Kafka(Strict):
    """Alert events to Kafka. TLS/SASL settings pass through to kafka-python."""

    enabled: bool = Field(False, description="Publish alert events to Kafka.")
    bootstrap_servers: list[str] = Field(["127.0.0.1:9092"], min_length=1, description="Brokers, host:port.")
    topic: str = Field("misalignment-monitor.alerts", description="Topic for alert events (CloudEvents JSON).")
    incident_topic: str = Field("misalignment-monitor.incidents",
                                description="Topic for incident events (one per fired request, when it finishes).")
    client_id: str = Field("misalignment-monitor", description="Kafka client id.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field("PLAINTEXT")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password_file: str | None = Field(None, description="File holding the SASL password (e.g. a mounted Secret). "
                                           "`~` and `$VAR` are expanded here and in the `ssl_*` paths; relative paths "
                                           "are from the config file's folder.")
    sasl_password_env: str | None = Field(None, description="Environment variable holding the SASL password.")
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    queue_size: int = Field(10000, gt=0, description="Events held in memory for the background sender.")
    spool_dir: str = Field("/tmp/misalignment-monitor-spool", description="On-disk spool used while the broker is unreachable.")
    spool_max_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Spool size cap; events beyond it are dropped and counted.")

    @model_validator(mode="before")
    @classmethod
    def _no_clear_text_secrets(cls, data):
        if isinstance(data, dict):
            for key in ("sasl_password", "password", "sasl_plain_password", "ssl_password"):
                if key in data:
                    raise ValueError(
                        f"`{key}` must not be written in the config file; use `sasl_password_file` "
                        "(a mounted Secret) or `sasl_password_env`"
                    )
        return data

    @model_validator(mode="after")
    def _sasl_complete(self) -> "Kafka":
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError(f"security_protocol {self.security_protocol} needs `sasl_mechanism`")
            if self.sasl_mechanism != "OAUTHBEARER" and not (self.sasl_password_file or self.sasl_password_env):
                raise ValueError("SASL needs `sasl_password_file` or `sasl_password_env`")
        return self


class Prometheus(Strict):
    """The sidecar's /metrics endpoint."""

    enabled: bool = Field(True, description="Serve /metrics.")
    host: str = Field("127.0.0.1", description="Bind address; loopback unless you expose it on purpose. "
                      "Environment variables are expanded (`$POD_IP`: the chart binds the pod's own address, not "
                      "every interface).")
    port: int = Field(9464, ge=1, le=65535, description="Port for /metrics and health endpoints.")
    expose_thresholds: bool = Field(False, description="Export each detector's threshold "
                                    "(`misalignment_monitor_detector_threshold`). Off: whoever can scrape the "
                                    "sidecar cannot learn how far below the firing line to stay.")


class Sinks(Strict):
    """Where alerts and metrics go."""

    kafka: Kafka = Field(default_factory=Kafka)
    prometheus: Prometheus = Field(default_factory=Prometheus)


class Redaction(Strict):
    """A pattern removed from a flagged conversation's text before anything leaves the sidecar."""

    name: str = Field(pattern=NAME_RE, description="Names the rule in events (`redacted_by`).")
    pattern: str = Field(description="Python regular expression, matched on the detokenized conversation.")
    replacement: str = Field("[REDACTED]", description="What the matched text becomes.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a valid regular expression ({e})") from e
        return pattern


# The personal data Presidio's pattern recognizers find without a language model (no spaCy model to
# download): monitor/sinks/recognizers.py maps each to its recognizer.
PII_ENTITIES = ("CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "DATE_TIME",
                "CRYPTO", "US_BANK_NUMBER", "US_PASSPORT", "US_DRIVER_LICENSE", "UK_NHS", "MEDICAL_LICENSE")
PiiEntity = Literal[PII_ENTITIES]  # type: ignore[valid-type]


class Evidence(Strict):
    """What of a flagged conversation may leave the sidecar, in incident events. Alert events never carry text."""

    text: Literal["none", "flagged"] = Field(
        "none", description="`none`: neither text nor token ids leave the sidecar, only positions and scores. "
        "`flagged`: requests a detector fired on are detokenized in the sidecar and their text (after `redact`) "
        "and token ids go into the incident event.")
    redact: list[Redaction] = Field(default_factory=list, description="Your own patterns (API keys, internal "
                                    "ids), applied, in order, after `recognize`, before text leaves.")
    recognize: list[PiiEntity] = Field(default_factory=list, description="Personal data found by Microsoft Presidio's "
                                       "recognizers (checksums and context checked: a card number must pass Luhn, an "
                                       "IBAN its check digits) and replaced by `[ENTITY]` before text leaves. Needs "
                                       "the `redact` extra. One of: " + ", ".join(PII_ENTITIES) + ".")
    recognize_min_score: float = Field(0.35, ge=0, le=1, description="A recognizer's confidence needed to redact "
                                       "(Presidio's scale: a validated card is 1.0, a phone number 0.4, a bare date 0.6).")
    read_reply: bool = Field(False, description="Read each flagged request's reply in the sidecar with the model's "
                             "tokenizer, to tell whether the model refused or answered (the incident's `outcome`, "
                             "`severity_if_answered`), even under `text: none`: the reply itself does not leave. "
                             "Always on under `text: flagged`. Needs the `text` extra (transformers).")
    reveal_public_key_file: str | None = Field(
        None, description="The console's public key (from `monitor console reveal-key`): under `text: flagged`, each "
        "redacted value's original is sealed to it and travels with the incident, unreadable anywhere but in a "
        "console holding the private key (`console.reveal_key_file`). Needs the `redact` extra (PyNaCl). Unset: "
        "the originals never leave the sidecar.")
    tokenizer: str | None = Field(None, description="Tokenizer folder for `flagged` and `read_reply`; default: "
                                  "`model.path`.")


class Incidents(Strict):
    """The trace the sidecar keeps per request, and the incident event sent when a fired request finishes."""

    enabled: bool = Field(True, description="Keep per-request traces and send incident events (to Kafka when "
                          "`sinks.kafka.enabled`).")
    max_trace_tokens: int = Field(4096, gt=0, description="Tokens traced per request; later ones are counted, not kept.")
    max_trace_tokens_total: int = Field(
        1_000_000, gt=0, description="Tokens traced across every request in flight (measured: 94-125 bytes each with "
        "four watched inputs and four detectors, up to twice that while a trace's arrays grow); beyond it, tokens "
        "are counted, not kept.")
    context_window: int = Field(1, ge=0, le=8, description="Tokens either side of an evidence token that also get "
                                "feature context.")
    max_context_rows: int = Field(
        32768, ge=0, description="Residual rows kept for feature context across every request in flight (each row is "
        "d_model values per SAE layer: 8 KiB at 4096 in bfloat16). When full, the rows of the request held longest "
        "that has not fired make room; rows that find none are counted, not kept.")
    top_features: int = Field(5, ge=1, le=64, description="Strongest SAE features reported per context token.")
    max_event_bytes: int = Field(900_000, ge=20_000, description="An incident event larger than this has its trace "
                                 "trimmed around the evidence (and says so). Keep it under the topic's max.message.bytes.")


class StoreSettings(Strict):
    """The incident store: `monitor incidents ingest` writes it, `monitor incidents list|show` read it."""

    url_file: str | None = Field(None, description="File holding the database URL (e.g. a mounted Secret), such as "
                                 "`postgresql+psycopg://user:password@host/db`. Read first.")
    url_env: str = Field("MONITOR_STORE_URL", description="Environment variable holding the database URL, used when "
                         "`url_file` is not set.")
    sqlite_path: str | None = Field(None, description="Without a URL: the SQLite file (default "
                                    "`<cache>/incidents.sqlite`, the cache being $MONITOR_CACHE_DIR or ~/.cache/misalignment-monitor).")
    retention_days: float = Field(30.0, gt=0, description="Alert and incident events older than this are deleted "
                                  "by the ingester (counted).")
    consumer_group: str = Field("misalignment-monitor-store", description="Kafka consumer group of the ingesters: "
                                "any number share the work, each event is stored once.")
    max_poll_interval_ms: int = Field(300000, gt=0, description="Kafka consumer setting (Kafka's default).")
    session_timeout_ms: int = Field(45000, gt=0, description="Kafka consumer setting (Kafka's default).")
    heartbeat_interval_ms: int = Field(3000, gt=0, description="Kafka consumer setting (Kafka's default).")
    max_event_bytes: int = Field(4 * 1024 * 1024, gt=0, description="A larger message goes to the dead letters.")
    metrics_host: str = Field("127.0.0.1", description="Where `monitor incidents ingest` serves `/metrics` (loopback "
                              "unless set; the chart sets 0.0.0.0 inside the pod).")
    metrics_port: int = Field(9466, ge=0, le=65535, description="Its port; 0: no metrics endpoint.")


Role = Literal["viewer", "triager", "admin"]


class ProxyAuth(Strict):
    """Accept the identity an authenticating proxy (oauth2-proxy style) puts in a header, from the proxy only."""

    enabled: bool = Field(False, description="Trust `user_header` on requests from `trusted_proxies`.")
    trusted_proxies: list[str] = Field(default_factory=list, description="Addresses or CIDR blocks the proxy connects "
                                       "from. A request carrying the header from anywhere else is refused (401).")
    user_header: str = Field("X-Forwarded-Email", description="Header naming the user.")
    groups_header: str = Field("X-Forwarded-Groups", description="Header listing the user's groups, comma-separated.")
    roles: dict[str, Role] = Field(default_factory=dict, description="Group -> role; a user gets the highest of their "
                                   "groups' roles.")
    text_groups: list[str] = Field(default_factory=list, description="Members of these groups may see conversation text.")
    default_role: Literal["none", "viewer"] = Field("none", description="Role of a user in no mapped group "
                                                     "(`none`: refused).")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, nets: list[str]) -> list[str]:
        import ipaddress

        for n in nets:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise ValueError(f"{n!r} is not an IP address or CIDR block") from None
        return nets


class Console(Strict):
    """`monitor console`: the web app over the incident store that alerts link to."""

    host: str = Field("127.0.0.1", description="Bind address; loopback unless you expose it on purpose (behind TLS).")
    port: int = Field(8470, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64, description="Server processes. One Python process answers one request at a "
                         "time; more serve more people at once (each keeps its own login-failure counts).")
    base_url: str | None = Field(None, description="The console's public URL (e.g. https://monitor.example.com). "
                                 "Alert events carry `<base_url>/incidents/<alert_id>`; https here makes cookies "
                                 "Secure. Unset: no links in events.")
    tokens_file: str | None = Field(None, description="YAML list of API/login tokens (argon2 hashes, role, text "
                                    "permission, expiry), made by `monitor console token`. Reloaded when it changes.")
    session_secret_file: str | None = Field(None, description="File holding the key that signs session cookies "
                                            "(replicas must share it).")
    session_secret_env: str = Field("MONITOR_CONSOLE_SECRET", description="Environment variable with that key, "
                                    "used when `session_secret_file` is unset. Neither: a random key per process "
                                    "(sessions end when it restarts).")
    session_hours: float = Field(12, gt=0, le=24 * 30, description="A login lasts this long.")
    login_attempts_per_minute: int = Field(5, ge=1, description="Failed logins allowed per client address per minute.")
    grafana_url: str | None = Field(None, description="Grafana's URL: the incident page links to the detector "
                                    "dashboard at the incident's time.")
    runbook_url: str = Field("https://github.com/misalignment-monitor/misalignment-monitor/blob/main/runbooks",
                             description="Where the runbooks are when the console does not serve them (the pages "
                             "link to `<runbook_url>/<alert>.md`).")
    runbooks_dir: str | None = Field(None, description="A folder of runbook pages (`<alert>.md`) the console serves "
                                     "at `/runbooks/`, and links to from its pages; its first steps are shown on the "
                                     "incident page. Unset: the `runbooks/` folder of a source checkout, when there.")
    alertmanager_url: str | None = Field(None, description="Alertmanager's URL: the console's Alerts page lists its "
                                         "active alerts (through its API), each linked to the incidents behind it.")
    reveal_key_file: str | None = Field(None, description="The private key (from `monitor console reveal-key`) that "
                                        "opens redacted values sealed by sidecars with `evidence.reveal_public_key_file`: "
                                        "a reader with the text permission may reveal them on an incident's page, and "
                                        "the audit log records it. Or `MONITOR_REVEAL_KEY`. Unset: values stay redacted.")
    proxy: ProxyAuth = Field(default_factory=ProxyAuth)

    @field_validator("base_url", "grafana_url", "runbook_url", "alertmanager_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return None if v is None else v.rstrip("/")


class Enforcement(Strict):
    """Acting on verdicts: detectors with `action: abort | annotate` tell vLLM's API servers through a control
    channel (a local socket per API server, beside the rings). See docs/enforcement.md."""

    fail_closed: bool = Field(False, description="With the sidecar gone (no heartbeat for `sidecar_timeout_s`), "
                              "refuse new generation requests (503) and abort those in flight. Default: serve "
                              "them unwatched (fail open).")
    heartbeat_s: float = Field(1.0, gt=0, le=60, description="How often the sidecar tells each API server it is "
                               "alive (and which actions its detectors take).")
    sidecar_timeout_s: float = Field(5.0, gt=0, description="An API server counts the sidecar as gone after this "
                                     "long without a heartbeat.")
    verdict_wait_ms: int = Field(250, ge=0, le=10000, description="At the end of a response, how long an API server "
                                 "waits for the sidecar's last verdict on it (only while the sidecar is alive and "
                                 "some detector acts), so that a detector firing on the last tokens still reaches "
                                 "the caller. 0: never wait.")

    @model_validator(mode="after")
    def _timeout_after_heartbeats(self) -> "Enforcement":
        if self.sidecar_timeout_s < 2 * self.heartbeat_s:
            raise ValueError(f"sidecar_timeout_s ({self.sidecar_timeout_s}) must be at least twice heartbeat_s "
                             f"({self.heartbeat_s}): one late heartbeat must not count as a dead sidecar")
        return self


class Drift(Strict):
    """Drift: each detector's score distribution and each watched input's firing rate over a sliding window,
    compared with the baseline `monitor calibrate` stored beside the threshold (a population-stability index).
    See docs/drift.md."""

    window_requests: int = Field(1000, ge=10, description="Requests in a detector's window: the last N final "
                                 "scores are compared with the calibration baseline.")
    window_tokens: int = Field(200_000, ge=100, description="Prompt tokens in the firing-rate window of each "
                               "watched input.")
    min_requests: int = Field(200, ge=10, description="No drift figure is exported before a detector's window holds "
                              "this many requests: a handful of requests says nothing about a distribution.")

    @model_validator(mode="after")
    def _min_within_window(self) -> "Drift":
        if self.min_requests > self.window_requests:
            raise ValueError(f"min_requests ({self.min_requests}) cannot exceed window_requests "
                             f"({self.window_requests}): the window would never hold enough")
        return self


class Deployment(Strict):
    """Names that identify this deployment in events."""

    name: str = Field("local", description="Deployment name; the `source` of alert events.")
    namespace: str | None = Field(None, description="Kubernetes namespace, if any; carried in alert events (`data.namespace`).")


class MonitorConfig(Strict):
    """The top level of the monitor's YAML file."""

    model: ModelSection = Field(default_factory=ModelSection)
    taps: list[Tap] = Field(default_factory=list, description="Layers tapped in vLLM. Empty: the plugin does nothing.")
    saes: list[SAESource] = Field(default_factory=list)
    probes: list[ProbeSource] = Field(default_factory=list)
    detectors: list[str] = Field(
        default_factory=list, description="Detector pack folders (searched recursively for *.yaml) or files."
    )
    scoring: Scoring = Field(default_factory=Scoring)
    sampling: Sampling = Field(default_factory=Sampling)
    transport: Transport = Field(default_factory=Transport)
    sinks: Sinks = Field(default_factory=Sinks)
    incidents: Incidents = Field(default_factory=Incidents)
    evidence: Evidence = Field(default_factory=Evidence)
    store: StoreSettings = Field(default_factory=StoreSettings)
    console: Console = Field(default_factory=Console)
    enforcement: Enforcement = Field(default_factory=Enforcement)
    drift: Drift = Field(default_factory=Drift)
    deployment: Deployment = Field(default_factory=Deployment)

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, data):
        if isinstance(data, dict) and "privacy" in data:
            raise ValueError("`privacy` was removed: `privacy.include_text` never had an effect (no prompt or "
                             "completion text leaves the sidecar); delete the section")
        return data

    @field_validator("taps")
    @classmethod
    def _unique_taps(cls, taps: list[Tap]) -> list[Tap]:
        layers = [t.layer for t in taps]
        if len(set(layers)) != len(layers):
            raise ValueError(f"layer listed twice in {sorted(layers)}")
        return taps

    @model_validator(mode="after")
    def _unique_names(self) -> "MonitorConfig":
        names = [s.name for s in self.saes] + [p.name for p in self.probes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"SAE and probe names must be unique; repeated: {dupes}")
        return self

    @property
    def tapped_layers(self) -> list[int]:
        return sorted(t.layer for t in self.taps)


# ---- detector packs -------------------------------------------------------------------------


class FeatureInput(Strict):
    """A detector input: one watched SAE feature."""

    sae: str = Field(description="Name of an SAE in the monitor config.")
    feature: int = Field(ge=0, description="Feature index in that SAE.")
    weight: float = Field(1.0, description="Weight under `combine: weighted`.")


class ProbeInput(Strict):
    """A detector input: one probe output."""

    probe: str = Field(description="Name of a probe in the monitor config.")
    output: str | None = Field(None, description="Probe output name; default: its first output.")
    weight: float = Field(1.0, description="Weight under `combine: weighted`.")


def _input_kind(v) -> str:
    if isinstance(v, dict):
        return "probe" if "probe" in v else "feature"
    return "probe" if isinstance(v, ProbeInput) else "feature"


# An input is a probe when it names one, else a feature: errors then name the right fields.
DetectorInput = Annotated[
    Union[Annotated[FeatureInput, Tag("feature")], Annotated[ProbeInput, Tag("probe")]],
    Discriminator(_input_kind),
]


class Max(Strict):
    """The highest token score."""

    kind: Literal["max"]


class Mean(Strict):
    """The mean token score (can miss a short burst in a long text)."""

    kind: Literal["mean"]


class Last(Strict):
    """The latest token's score. With `scope: prompt`, the last prompt token: where the model has read the
    whole request and not yet answered (how the harmful-request probe and the defection probe of
    docs/case-study.md read it). It is judged once the prompt's end has arrived: a long prompt prefilled in
    chunks is not judged at the end of an earlier chunk."""

    kind: Literal["last"]


class EmaMax(Strict):
    """The highest value of an exponential moving average of token scores."""

    kind: Literal["ema_max"]
    alpha: float = Field(gt=0, le=1, description="EMA weight of the newest token.")


class RollingMeanMax(Strict):
    """The highest mean over any `window` consecutive tokens."""

    kind: Literal["rolling_mean_max"]
    window: int = Field(ge=1, description="Tokens per rolling window.")


class CountAbove(Strict):
    """How many tokens reach `token_threshold` (0 until `min_tokens` do)."""

    kind: Literal["count_above"]
    token_threshold: float = Field(
        description="A token supports the verdict when its score reaches this (a probability for probe inputs)."
    )
    min_tokens: int = Field(1, ge=1, description="Supporting tokens needed before the score counts.")


class FractionAbove(Strict):
    """The fraction of tokens reaching `token_threshold` (0 until `min_tokens` do)."""

    kind: Literal["fraction_above"]
    token_threshold: float
    min_tokens: int = Field(1, ge=1)


Aggregation = Annotated[
    Union[Max, Mean, Last, EmaMax, RollingMeanMax, CountAbove, FractionAbove], Field(discriminator="kind")
]


class DetectorSpec(Strict):
    """One detector: a file in a detector pack."""

    name: str = Field(pattern=NAME_RE, description="Unique detector name (a Prometheus label value).")
    concept: str = Field(pattern=NAME_RE, description="Concept tag, e.g. `pii`.")
    description: str = ""
    inputs: list[DetectorInput] = Field(min_length=1, description="Features and/or probes.")
    combine: Literal["any", "all", "weighted"] = Field(
        "any", description="any/all: each input aggregated and compared; weighted: inputs summed per token first."
    )
    aggregation: Aggregation
    threshold: float = Field(
        description="The detector fires when its score reaches this. Its space: a probability for detectors whose "
        "inputs are all probes (the sigmoid of the aggregated logits); activation units for SAE features (and "
        "weighted sums); a count or fraction for `count_above` / `fraction_above`."
    )
    scope: Literal["prompt", "generation", "both"] = "both"
    severity: Literal["critical", "warning", "info"] = "warning"
    severity_if_answered: Literal["critical", "warning", "info"] | None = Field(
        None, description="The severity of this detector's incidents when the model went along: its reply opens "
        "without a refusal. A request-side detector can warn when a request arrives and page when the model "
        "answered it (alert MisalignmentModelAnswered). Needs the reply read in the sidecar: `evidence.text: "
        "flagged` or `evidence.read_reply`, and `incidents.enabled`.")
    action: Literal["none", "annotate", "abort"] = Field(
        "none", description="What happens to a request when the detector fires: `none` (alert only), `annotate` "
        "(the response names the alert: headers, or a trailing SSE event), `abort` (vLLM stops the request; the "
        "caller gets `finish_reason: content_filter`). Needs the middleware in vLLM's API server.")
    mode: Literal["live", "shadow"] = Field(
        "live", description="`live`: fires page (through the Prometheus rules), act, and count. `shadow`: the "
        "detector scores, counts and records incidents (marked shadow, listed apart in the console) but never "
        "pages and never acts: how a new detector is watched on real traffic before it is trusted. Switching is "
        "a config reload.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels carried into events.")
    calibration: Calibration | None = Field(None, description="Provenance of `threshold` (written by `monitor calibrate`).")
    record_threshold: float | None = Field(
        None, description="A second, lower tier. At this score the detector records: an alert event and an incident "
        "(tier `record`, counted with `tier=\"record\"`), never a page and never an action; at `threshold` the same "
        "alert escalates to tier `page`, which pages and acts. Below `threshold`, in its space. Absent: one tier, "
        "`page`. `monitor calibrate --record-fpr RATE` sets it from the same benign set as `threshold`.")
    record_calibration: Calibration | None = Field(
        None, description="Provenance of `record_threshold` (written by `monitor calibrate --record-fpr`).")

    @model_validator(mode="after")
    def _tiers_in_order(self) -> "DetectorSpec":
        if self.record_threshold is not None and not self.record_threshold < self.threshold:
            raise ValueError(f"record_threshold {self.record_threshold:g} must be below threshold {self.threshold:g}: "
                             "the record tier is the lower one, the page tier the higher")
        if self.record_calibration is not None and self.record_threshold is None:
            raise ValueError("record_calibration describes a record_threshold, which is not set")
        return self

    def tier_of(self, score: float) -> Literal["record", "page"] | None:
        """The highest tier a score reaches, or None."""
        if score >= self.threshold:
            return "page"
        if self.record_threshold is not None and score >= self.record_threshold:
            return "record"
        return None

    @property
    def lowest_threshold(self) -> float:
        """Where the detector first fires: its record tier when it has one."""
        return self.threshold if self.record_threshold is None else self.record_threshold

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        bad = [k for k in labels if not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", k)]
        if bad:
            raise ValueError(f"label names must match [a-zA-Z_][a-zA-Z0-9_]*: {bad}")
        return labels
