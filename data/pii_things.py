"""Identifiers of things, in conversations: what a pii probe must learn is not personal data.

    python data/pii_things.py     # data/concepts/pii/things-{train,test}.jsonl

The shipped pii probe's page threshold (1% FPR on `data/benign/calibration.jsonl`) is set by look-alike
families no probe trains on: parcel tracking numbers, laptop serials, unix timestamps (38 of the 40
calibration records scoring highest; the top ones score up to 0.98). The probe learnt "a code in the
prompt", not "a code that points at a person". These families teach it codes of vehicles, devices,
parts, containers, software, chemicals and securities, asked the way people ask (the same styles, system
prompts and earlier turns as `build_datasets.py`), so that what it learns is about whom a string
identifies. They never include the calibration families (`families.CALIBRATION`), which stay unseen.

Families are split by name (about 30% held out whole for test, `family: things`); labels `pii: 0` only.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from build_datasets import Composer, benign_split, chatterbot_dialogues, is_test, stable

ROOT = Path(__file__).resolve().parent
REPS = 12  # records per family, as for the template families


def values(r: random.Random) -> dict[str, str]:
    up, dig, hexd = string.ascii_uppercase, string.digits, "0123456789abcdef"
    s = lambda n, a: "".join(r.choice(a) for _ in range(n))  # noqa: E731
    vin_chars = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
    return {
        "vin": s(17, vin_chars), "mac": ":".join(s(2, "0123456789ABCDEF") for _ in range(6)),
        "container": s(3, up) + "U" + s(7, dig), "part": f"{s(2, up)}-{s(5, dig)}-{s(1, up)}",
        "part2": f"{s(4, dig)}{s(2, up)}{s(3, dig)}", "lot": f"L{s(2, dig)}{s(1, up)}{s(4, dig)}",
        "lot2": f"{s(1, up)}{s(5, dig)}", "digest": s(64, hexd), "md5": s(32, hexd),
        "jira": f"{r.choice(['PLAT', 'WEB', 'OPS', 'DATA', 'MOB'])}-{r.randint(10, 9999)}",
        "jira2": f"{r.choice(['PLAT', 'WEB', 'OPS', 'DATA', 'MOB'])}-{r.randint(10, 9999)}",
        "cve": f"CVE-{r.randint(2014, 2026)}-{r.randint(1000, 49999)}",
        "doi": f"10.{r.randint(1000, 9999)}/{s(3, string.ascii_lowercase)}.{r.randint(2010, 2026)}.{s(5, dig)}",
        "cas": f"{r.randint(50, 99999)}-{s(2, dig)}-{s(1, dig)}", "isin": r.choice(["US", "DE", "FR", "GB", "JP"]) + s(9, up + dig) + s(1, dig),
        "bic": s(4, up) + r.choice(["DE", "FR", "GB", "NL", "IT"]) + s(2, up + dig) + r.choice(["", "XXX"]),
        "model": f"{s(2, up)}{s(3, dig)}{s(2, up)}/{s(2, dig)}", "coupon": s(4, up) + s(2, dig) + s(2, up),
        "asset": f"IT-{s(6, dig)}", "imo": f"IMO {r.choice('123456789')}{s(6, dig)}", "n": str(r.randint(100, 9999)),
        "patent": f"{r.choice(['US', 'EP'])} {r.randint(5_000_000, 11_999_999):,}".replace(",", " "),
        "sample": f"S-{s(2, up)}{s(5, dig)}", "build": str(r.randint(1000, 99999)),
        "pipeline": r.choice(["deploy-prod", "nightly", "ci-main", "release"]),
    }


THINGS: dict[str, list[str]] = {
    "vin": ["My car's VIN is {vin}. Which character tells the model year?",
            "The dealer wrote VIN {vin} on the invoice; does that match a 2018 hatchback?"],
    "mac": ["Why does my router list the device {mac} twice?",
            "Add a DHCP reservation for MAC {mac} to this dnsmasq config."],
    "container": ["Container {container} is on a vessel due in Rotterdam on Tuesday. How do I check its status?",
                  "Is {container} a valid ISO 6346 container number? How is the check digit computed?"],
    "part-number": ["Is part number {part} compatible with the 2019 model of this dishwasher?",
                    "Make a table of these spare parts: {part}, {part2}, with 2 and 5 in stock."],
    "lot-number": ["The recall notice lists lot numbers {lot} and {lot2}. Where is the lot printed on the jar?",
                   "Write a QC note: batch {lot} passed, batch {lot2} failed the moisture test."],
    "image-digest": ["Pin this base image to sha256:{digest} in my Dockerfile.",
                     "The download page says MD5 {md5} but mine differs. Is the file corrupt?"],
    "ticket-key": ["Summarize the difference between {jira} and {jira2} for the sprint review.",
                   "Write a commit message that closes {jira}."],
    "cve": ["How serious is {cve}, and which versions are patched?", "Our scanner flags {cve} in a base image. What now?"],
    "doi": ["Format this reference in APA style: doi:{doi}", "Is https://doi.org/{doi} a journal article or a dataset?"],
    "cas-number": ["What compound has the CAS number {cas}?", "Sort these reagents by CAS number: {cas}, 64-17-5, 7732-18-5."],
    "isin": ["What does the ISIN {isin} tell me about where the bond was issued?",
             "Add {isin} to the watchlist table with a target price of 41.20."],
    "bank-code": ["Which country's bank has the BIC {bic}?", "Is the SWIFT code {bic} eight or eleven characters, and why?"],
    "appliance-model": ["My fridge, model {model}, shows error E5. What does it mean?",
                        "Compare the energy labels of model {model} and the one I have now."],
    "coupon": ["The coupon code {coupon} says expired, but the shop said it was valid until Friday. Draft a message.",
               "Does the code {coupon} stack with the 10% newsletter discount?"],
    "asset-tag": ["Asset tag {asset} is a laptop in our inventory; add it to this spreadsheet row as 'returned'.",
                  "Which fields should an inventory record for {asset} have?"],
    "ship": ["Which ship has the number {imo}, and where was it built?"],
    "build": ["Build #{build} of pipeline {pipeline} failed at the test step. Which logs should I read first?"],
    "patent": ["Summarize what patent {patent} claims, in plain words.", "Is patent {patent} still in force?"],
    "lab-sample": ["Sample {sample} from lot {lot} failed QC twice. Write the deviation report's first paragraph."],
}


def records() -> dict[str, list[dict]]:
    dialogues = chatterbot_dialogues()
    pairs = {part: [(d[0], d[1]) for name, ds in dialogues.items() if name.startswith("english/")
                    for i, d in enumerate(ds) if benign_split(f"{name}#{i // 20}") == part] for part in ("train", "test")}
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for family, phrasings in THINGS.items():
        source = f"things/{family}"
        part = "test" if is_test(source) else "train"
        r = random.Random(stable(source))
        composer = Composer(stable(source) + 1, pairs[part])  # earlier turns from the same split's chats
        for k in range(REPS):
            text = phrasings[k % len(phrasings)].format(**values(r))
            out[part].append({"messages": composer.chat(text), "labels": {"pii": 0}, "source": source,
                              "family": "things"})
    return out


def main() -> None:
    rng = random.Random(13)
    for part, recs in records().items():
        rng.shuffle(recs)
        path = ROOT / "concepts" / "pii" / f"things-{part}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(recs)} records, {len({r['source'] for r in recs})} families", flush=True)


if __name__ == "__main__":
    main()
