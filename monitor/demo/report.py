"""What the demo shows a person (and writes as summary JSON): which detectors fired on which requests
and why, the Kafka events, the Prometheus alerts and the pages."""

from __future__ import annotations

from pathlib import Path

from monitor.demo.checks import CONSUMER_GROUP, Expectations
from monitor.demo.traffic import DemoRequest
from monitor.sinks.events import tier_of


def summary(exp: Expectations, requests: list[DemoRequest], model: Path, consumer, stored, prom, receiver,
            topic: str, degraded: list[str], run: Path, urls: dict[str, str]) -> dict:
    """What happened, as the summary JSON `--once` writes."""
    events = consumer.received() if consumer else []
    token_text = token_texts(model, requests)
    reqs = []
    for r in requests:
        fired = {}
        for e in events:
            if e["subject"] != r.request_id:
                continue
            d = e["data"]
            if d["detector"] not in fired or d["revision"] >= fired[d["detector"]]["revision"]:
                fired[d["detector"]] = {
                    "revision": d["revision"], "tier": tier_of(d), "severity": d["severity"], "score": d["score"],
                    "threshold": d["threshold"], "aggregation": d["aggregation"]["kind"], "final": d["final"],
                    "top_tokens": [{"position": t["position"], "score": t["score"],
                                    "token": token_text.get(r.request_id, {}).get(t["position"]),
                                    "inputs": t["inputs"]} for t in d["tokens"][:3]]}
        reqs.append({"name": r.name, "request_id": r.request_id, "expected": r.expect, "fired": fired,
                     "answer": r.answer, "error": r.error})
    alerts = [{"alertname": a["labels"]["alertname"], "state": a["state"], "labels": a["labels"]}
              for a in (prom.alerts() if prom else []) if a["labels"]["alertname"] != "MisalignmentMonitorWatchdog"]
    pages = [{"receiver": p.receiver, "path": p.path,
              "alerts": [{"alertname": a["labels"].get("alertname"), "detector": a["labels"].get("detector"),
                          "severity": a["labels"].get("severity"), "status": a.get("status"),
                          "console_url": a.get("annotations", {}).get("console_url")}
                         for a in p.body.get("alerts", [])],
              "pagerduty_event": p.body.get("event_action")}
             for p in (receiver.received() if receiver else []) if p.receiver != "deadmansswitch"]
    missing = exp.missing()
    return {"ok": not missing and not any(r.error for r in requests), "missing": missing,
            "degraded": degraded, "run_folder": str(run), "urls": urls,
            "requests": reqs, "kafka": {"topic": topic, "consumer_group": CONSUMER_GROUP, "events": len(events)},
            "kafka_events": events, "prometheus_alerts": alerts, "pages": pages,
            "incidents": [incident_summary(e) for e in (stored.received() if stored else [])]}


def incident_summary(e: dict) -> dict:
    """One incident, as a person would first want it: which words made which detector fire."""
    d = e["data"]
    t = d["trace"]
    fired = [x for x in d["detectors"] if x["fired"]]
    words = {}
    for x in fired:
        top = x["evidence"][0]["position"] if x["evidence"] else None
        if top is not None and t["text"] is not None and top in t["positions"]:
            j = t["positions"].index(top)
            lo = max(0, j - 6)
            while lo > 0 and not "".join(t["text"][lo : j + 3]).strip():  # inside a redacted span: its replacement
                lo -= 1
            words[x["name"]] = "".join(t["text"][lo : j + 3])
    return {"request_id": e["subject"], "event_id": e["id"], "alert_ids": d["alert_ids"],
            "detectors": [x["name"] for x in fired], "tokens_traced": len(t["positions"]),
            "prompt_tokens": d["prompt_tokens"], "context_tokens": len(d["context"]), "text_policy": d["text_policy"],
            "redacted_by": d["redacted_by"], "words_around_the_top_token": words, "outcome": d.get("outcome"),
            "tier": tier_of(d),
            "severities": {x["name"]: x["severity"] for x in fired}}


def show(s: dict) -> None:
    """The summary for a person: requests and detectors, events, alerts, pages."""
    print("\n=== requests and detectors " + "=" * 50)
    for r in s["requests"]:
        status = "ERROR " + r["error"] if r["error"] else (", ".join(
            f"{d} {v['score']:.3g}>={v['threshold']:.3g} ({v['severity']}"
            + (", record tier: kept, not paged)" if v["tier"] == "record" else ")") for d, v in r["fired"].items())
            or "no detector fired")
        print(f"{r['request_id']:<34} {status}")
        for d, v in r["fired"].items():
            for t in v["top_tokens"]:
                feats = ", ".join(f"{i['input']}={i['value']:.2f}" + (f" ({i['explanation'][:50]})" if i.get("explanation") else "")
                                  for i in t["inputs"])
                tok = f" {t['token']!r}" if t["token"] is not None else ""
                print(f"    {d}: position {t['position']}{tok} score {t['score']:.3f} <- {feats}")
    print(f"\n=== Kafka: {s['kafka']['events']} alert event(s) on {s['kafka']['topic']}, "
          f"consumed by group {s['kafka']['consumer_group']} " + "=" * 10)
    for e in s["kafka_events"]:
        d = e["data"]
        print(f"  {e['time']} {e['subject']:<34} {d['detector']:<24} rev {d['revision']} {tier_of(d)}"
              f"{' final' if d['final'] else ''} score {d['score']:.3g} id {e['id'][:8]}")
    print(f"\n=== incidents stored: {len(s['incidents'])} (one per flagged request, with its trace; "
          f"`monitor incidents list --config {s['run_folder']}/monitor.yaml`) " + "=" * 4)
    for i in s["incidents"]:
        print(f"  {i['request_id']:<34} {', '.join(i['detectors'])}"
              + (" (record tier: kept for review, nobody paged)" if i["tier"] == "record" else "")
              + f": {i['tokens_traced']} tokens traced "
              f"({i['prompt_tokens']} prompt), feature context at {i['context_tokens']} token(s)"
              + (f", redacted: {', '.join(i['redacted_by'])}" if i["redacted_by"] else "")
              + f"; the model {dict(refused='refused', answered='answered (no refusal)', no_reply='had not replied').get(i['outcome'], 'reply: not read')}")
        for det, words in i["words_around_the_top_token"].items():
            print(f"      {det} fired around: {words!r}")
    if s.get("console"):
        c = s["console"]
        print(f"\n=== console: {c['url']}/incidents " + "=" * 40)
        print(f"  log in with the demo token:\n{c['token']}")
        for i in s["incidents"]:
            print(f"  {', '.join(i['detectors']):<40} {c['url']}/incidents/{i['alert_ids'][0]}")
    print("\n=== Prometheus alerts " + "=" * 55)
    for a in s["prometheus_alerts"]:
        labels = ", ".join(f"{k}={v}" for k, v in a["labels"].items() if k not in ("alertname",))
        print(f"  {a['state']:<8} {a['alertname']} {{{labels}}}")
    print("\n=== pages received (Alertmanager -> webhook / PagerDuty Events API) " + "=" * 9)
    for p in s["pages"]:
        what = ", ".join(f"{a['alertname']}({a['detector']}, {a['severity']}, {a['status']})" for a in p["alerts"])
        print(f"  {p['receiver']:<13} {p['path']:<34} {what or 'PagerDuty ' + str(p['pagerduty_event'])}")
    landing = sorted({(a["detector"], a["console_url"]) for p in s["pages"] for a in p["alerts"] if a.get("console_url")})
    if landing:
        print("  where each alert lands in the console (its console_url):")
        for detector, url in landing:
            print(f"    {detector:<26} {url}")
    bad = {k: v for k, v in s.get("links", {}).items() if v != 200}
    if s.get("links"):
        print(f"\n=== links: {len(s['links']) - len(bad)} of {len(s['links'])} printed links answer 200"
              + (f"; not: {bad}" if bad else ""))
    print("\n(alert events carry no text: the token text above is the demo client's own copy of its prompts. "
          "Incidents carry text because the demo runs with evidence.text: flagged; the default is none.)")
    for m in s["degraded"]:
        print(f"DEGRADED: {m}")
    print("RESULT: all expected signals arrived" if s["ok"] else "RESULT: missing:\n  " + "\n  ".join(s["missing"]))


def token_texts(model: Path, requests: list[DemoRequest]) -> dict[str, dict[int, str]]:
    """Position -> token text of each prompt, from the client's own copy (nothing comes from the sidecar)."""
    from transformers import AutoTokenizer

    from monitor.offline.rows import chat_token_ids

    tok = AutoTokenizer.from_pretrained(model)
    return {r.request_id: {i: tok.decode([t]) for i, t in enumerate(chat_token_ids(tok, r.messages, True))}
            for r in requests}
