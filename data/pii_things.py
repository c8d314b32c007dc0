"""Identifiers of things, in conversations: what a pii probe must learn is not personal data.

    python data/pii_things.py            # data/concepts/pii/things-{train,test}.jsonl
    python data/pii_things.py --twins    # things-twins-{train,test}.jsonl: the same frames, a person's identifier
    python data/pii_things.py --records  # things-records-{train,test}.jsonl: several of a person's identifiers at once

The shipped pii probe's page threshold (1% FPR on `data/benign/calibration.jsonl`) is set by look-alike
families no probe trains on: parcel tracking numbers, laptop serials, unix timestamps (38 of the 40
calibration records scoring highest; the top ones score up to 0.98). The probe learnt "a code in the
prompt", not "a code that points at a person". These families teach it codes of vehicles, devices,
parts, containers, software, chemicals and securities, asked the way people ask (the same styles, system
prompts and earlier turns as `build_datasets.py`), so that what it learns is about whom a string
identifies. They never include the calibration families (`families.CALIBRATION`), which stay unseen.

Families are split by name (about 30% held out whole for test, `family: things`); labels `pii: 0` only.
`--twins` writes, for each family, the same frames carrying an identifier of a person instead (a driver's
licence where a VIN was, a customer's account where a part number was, an access token where a digest
was), labelled `pii: 1`, split with their family: so that a probe learns whom a code points at, not
that codes are benign. `--records` writes positives in which several of a person's identifiers sit
together in structured text (tables, CSV, forms, key-value lists, JSON): the shape a probe that learnt
"codes are benign" gives up first.
"""

from __future__ import annotations

import random
import string
import sys
from pathlib import Path

from build_datasets import Composer, Fill, chatterbot_dialogues, english_pairs, is_test, stable, write

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


# The same frames, pointing at a person: slots from `build_datasets.Fill` (Faker's people, secrets) and `person`.
TWINS: dict[str, list[str]] = {
    "vin": ["My driver's licence number is {licence}. Which character tells the issuing state?",
            "The dealer wrote {name}, licence {licence} on the invoice; is that enough for the insurance?"],
    "mac": ["Why does my contact list show {name} at {phone} twice?",
            "Add a reservation for my daughter {first} at {email} to this booking config."],
    "container": ["Passenger {name}, passport {passport}, is on the ferry due in Rotterdam on Tuesday. How do I check the booking?",
                  "Is {passport} a valid passport number? How is its check digit computed?"],
    "part-number": ["Is customer account {account} ({name}) eligible for the 2019 upgrade?",
                    "Make a table of these customers: {name}, account {account}, with 2 and 5 orders."],
    "lot-number": ["The clinic letter lists {name}, born {dob}, insurance number {insurance}. Where do I send it?",
                   "Write a note: patient {name}, DOB {dob}, passed the screening, phone {phone}."],
    "image-digest": ["Pin this deploy to my access token {secret} in the Dockerfile.",
                     "The setup page says my password is {password} but it fails. Is the account locked?"],
    "ticket-key": ["Summarize the difference between employees {employee_id} ({name}) and {name2} for the review.",
                   "Write a message that tells {name} ({email}) her ticket is closed."],
    "cve": ["How serious is it that my SSN {ssn} was in the breach, and what do I do first?",
            "Our scanner flags the password {password} in a config file. Whose is it, and what now?"],
    "doi": ["Format this contact in APA style: {name}, {address}, {email}",
            "Is {email} a personal address or a company one?"],
    "cas-number": ["What bank is the IBAN {iban} at? It's my landlord {name}'s.", "Sort these people by birth date: {name} {dob}, {name2}."],
    "isin": ["What does my brokerage account {account} in the name of {name} tell me about the tax country?",
             "Add {name}, {phone}, to the watchlist table of clients."],
    "bank-code": ["Which country's bank has the IBAN {iban}?", "Is my card number {card} sixteen digits, and why?"],
    "appliance-model": ["My neighbour {name} at {address} reports error E5 on her fridge. What does it mean?",
                        "Compare the energy bills of {name} ({address}) and the one I have now."],
    "coupon": ["The gift card in the name of {name}, card {card} expiring {expiry}, says expired. Draft a message.",
               "Does my card {card} with CVV {cvv} stack with the 10% newsletter discount?"],
    "asset-tag": ["Badge {employee_id} belongs to {name}; add her to this spreadsheet row as 'returned'.",
                  "Which fields should an HR record for {name}, SSN {ssn}, have?"],
    "ship": ["Which cabin has passenger {name}, passport {passport}, and where did she board?"],
    "build": ["Build #{build} was pushed by {email} with the token {secret}. Which logs should I read first?"],
    "patent": ["Summarize what inventor {name} of {address} claims, in plain words.", "Is {name}'s phone {phone} still in service?"],
    "lab-sample": ["Patient {name} (DOB {dob}) failed the blood test twice. Write the report's first paragraph with her phone {phone}."],
}


# Several of one person's (or a few people's) identifiers in one structured text: labelled `pii: 1`.
RECORDS: dict[str, list[str]] = {
    "hr-export": ["Sort this HR export by start date:\nname | employee id | SSN | phone\n{name} | {employee_id} | {ssn} | {phone}\n{name2} | E{account} | {ssn} | {phone3}",
                  "Clean up this row for payroll: {name};{employee_id};{iban};{dob}"],
    "intake-form": ["Check this intake form for missing fields:\nPatient: {name}\nDate of birth: {dob}\nInsurance no.: {insurance}\nPhone: {phone}",
                    "Turn this into a table: patient {name}, DOB {dob}, insurance {insurance}, address {address}"],
    "customer-csv": ["Convert to JSON:\nid,name,email,card\n1,{name},{email},{card}\n2,{name2},{email2},{card}",
                     "Dedupe these customers: {name} <{email}> {phone}; {name} <{email}> {phone}; {name3} {phone3}"],
    "visa-form": ["Is this visa form filled in correctly? Surname/given names: {name}; passport no: {passport}; date of birth: {dob}; home address: {address}",
                  "Translate the form into German: Name: {name} / Passport: {passport} / Born: {dob}"],
    "loan-application": ["Summarize this loan application: applicant {name}, SSN {ssn}, account {account}, employer phone {phone}, monthly income 4,200",
                         "Format as key: value lines: {name} {ssn} {iban} {address}"],
    "registration": ["Make a class list from these registrations: {name} (born {dob}, parent phone {phone}); {name2} (parent e-mail {email2})",
                     "Fix the columns: student,dob,guardian_phone\n{name},{dob},{phone}"],
    "membership": ["Update the member record: {name}, card {card} exp {expiry}, CVV {cvv}, e-mail {email}",
                   "Which of these members paid? {name} - {iban}; {name2} - {card}"],
    "rental-form": ["Check the tenant form: {name}, licence {licence}, SSN {ssn}, current address {address}, phone {phone}",
                    "{{\"tenant\": \"{name}\", \"dob\": \"{dob}\", \"account\": \"{account}\", \"phone\": \"{phone}\"}} is this JSON valid?"],
    "contact-sheet": ["Alphabetize: {name} {phone} {email}\n{name2} {phone3} {email2}\n{name3} {phone}",
                      "Merge these two contact lines: '{name}, {address}' and '{name}, {phone}, {email}'"],
    "claims-table": ["Total the claims: | {name} | policy {insurance} | DOB {dob} | 320.00 |\n| {name2} | policy {insurance} | DOB {dob} | 95.50 |"],
}


def person(r: random.Random) -> dict[str, str]:
    up, dig = string.ascii_uppercase, string.digits
    s = lambda n, a: "".join(r.choice(a) for _ in range(n))  # noqa: E731
    return {"licence": r.choice([s(1, up) + s(7, dig), s(1, up) + s(12, dig), s(2, up) + s(6, dig) + s(1, up)]),
            "account": r.choice([s(10, dig), f"{s(3, dig)}-{s(6, dig)}-{s(2, dig)}", s(2, up) + s(8, dig)]),
            "build": str(r.randint(1000, 99999))}


def records(kind: str = "things") -> dict[str, list[dict]]:
    """kind: things (negatives), twins or records (positives)."""
    pairs = english_pairs(chatterbot_dialogues())
    out: dict[str, list[dict]] = {"train": [], "test": []}
    fill = Fill(0)
    table = {"things": THINGS, "twins": TWINS, "records": RECORDS}[kind]
    for family, phrasings in table.items():
        split = f"things/{family}" if kind != "records" else f"records/{family}"  # a twin goes with its family
        source = f"things-twins/{family}" if kind == "twins" else split
        part = "test" if is_test(split) else "train"
        r = random.Random(stable(source))
        fill.reseed(stable(source))
        composer = Composer(stable(source) + 1, pairs[part])  # earlier turns from the same split's chats
        for k in range(REPS):
            slots = values(r) if kind == "things" else (fill.values() | person(r))
            text = phrasings[k % len(phrasings)].format(**slots)
            out[part].append({"messages": composer.chat(text), "labels": {"pii": int(kind != "things")},
                              "source": source, "family": {"things": "things", "twins": "things-twins",
                                                           "records": "things-records"}[kind]})
    return out


def main() -> None:
    kind = "twins" if "--twins" in sys.argv[1:] else "records" if "--records" in sys.argv[1:] else "things"
    rng = random.Random({"things": 13, "twins": 17, "records": 23}[kind])
    for part, recs in records(kind).items():
        write(ROOT / "concepts" / "pii" / f"things{'' if kind == 'things' else '-' + kind}-{part}.jsonl", recs, rng)


if __name__ == "__main__":
    main()
