"""Triaged incidents as labelled conversations: production's false positives become the next
calibration's hard negatives, its true positives the next probe's examples.

Writes the JSON lines `monitor eval`, `monitor calibrate` and `monitor probe train` read
(`monitor/offline/records.py`): `{"messages": [...], "labels": {"<concept>": 0|1}, "source": ...}`,
one line per incident, labelled for the concept of every detector that fired on it: 1 for a true
positive, 0 for a false positive (`unsure` verdicts are never exported: a guess is not a label).

An incident carries its conversation as token texts (only under `evidence.text: flagged`, after
redaction), chat template included; the messages are recovered from the template's markers
(ChatML, as SmolLM2/Qwen use, and Llama 3's headers), else the prompt is one user message. An
incident without text, or whose trace misses tokens (a prefix-cache hit vLLM never computed, a
trace cap, a size trim), is skipped and counted: a conversation with holes would teach the wrong thing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import IO

EXPORTABLE = ("true_positive", "false_positive")
_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)
_LLAMA3 = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>|</s>|<s>")


@dataclass
class ExportStats:
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _messages(prompt: str) -> list[dict]:
    for pattern in (_CHATML, _LLAMA3):
        found = [(role, content.strip()) for role, content in pattern.findall(prompt)]
        if found:
            # The generation prompt ends the prompt with an empty assistant turn: not a message.
            return [{"role": r, "content": c} for r, c in found if c or r != "assistant"]
    text = _SPECIAL.sub("", prompt).strip()
    return [{"role": "user", "content": text}] if text else []


def conversation(event: dict) -> tuple[list[dict] | None, str | None]:
    """The incident's messages (prompt turns, then the completion as the assistant's), or None and why not."""
    d = event["data"]
    t = d["trace"]
    if t.get("text") is None:
        return None, "no text kept (evidence.text: none)"
    if t.get("trimmed") or d["coverage"]["uncovered_positions"] or d["coverage"]["untraced_tokens"]:
        return None, "trace incomplete (prefix cache, trace cap or size trim)"
    positions = t["positions"]
    if positions != list(range(len(positions))):  # every token, from the first
        return None, "trace incomplete (prefix cache, trace cap or size trim)"
    n_prompt = d["prompt_tokens"]
    prompt = "".join(x for p, x in zip(positions, t["text"]) if p < n_prompt)
    completion = _SPECIAL.sub("", "".join(x for p, x in zip(positions, t["text"]) if p >= n_prompt)).strip()
    msgs = _messages(prompt)
    if completion:
        msgs.append({"role": "assistant", "content": completion})
    if not msgs:
        return None, "empty conversation"
    return msgs, None


def labelled_record(event: dict, verdict: str, note: str | None) -> tuple[dict | None, str | None]:
    if verdict not in EXPORTABLE:
        return None, f"verdict {verdict}"
    msgs, why = conversation(event)
    if msgs is None:
        return None, why
    d = event["data"]
    value = 1 if verdict == "true_positive" else 0
    labels = {x["concept"]: value for x in d["detectors"] if x["fired"]}
    return {"messages": msgs, "labels": labels, "source": f"production/{d['deployment']}",
            "verdict": verdict, "note": note, "alert_ids": d["alert_ids"], "request_id": d["request_id"]}, None


def write_export(store, out: IO[str], verdicts: tuple[str, ...] = EXPORTABLE, f=None, batch: int = 200) -> ExportStats:
    """Write every triaged incident with one of `verdicts` (and matching the filter `f`) to `out`."""
    from sqlalchemy import select

    from monitor.store.queries import IncidentFilter, _conditions
    from monitor.store.schema import Incident, IncidentBody

    bad = [v for v in verdicts if v not in EXPORTABLE]
    if bad:
        raise ValueError(f"cannot export verdict(s) {bad}: only {', '.join(EXPORTABLE)} are labels")
    stats = ExportStats()
    cond = _conditions(f or IncidentFilter())
    q = (select(IncidentBody.event, Incident.verdict, Incident.verdict_note)
         .join(Incident, Incident.event_id == IncidentBody.event_id)
         .where(Incident.verdict.in_(verdicts), *cond).order_by(Incident.event_time))
    with store.session() as s:
        for event, verdict, note in s.execute(q.execution_options(yield_per=batch)):
            rec, why = labelled_record(event, verdict, note)
            if rec is None:
                stats.skip(why)
                continue
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            stats.written += 1
    return stats
