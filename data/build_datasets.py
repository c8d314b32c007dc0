"""Build the demo data sets from hand-written families, Faker and the chatterbot corpus (deterministic).

    python data/build_datasets.py

Writes
- data/concepts/<concept>/{train,test}.jsonl: labelled conversations for pii, prompt_injection and
  harmful_request. Positives and hard negatives come from `families.py` (many ways of asking, in
  several styles and languages), filled with Faker's personal data and look-alike identifiers
  (ISBNs, order numbers, UUIDs, commit hashes, test card numbers, coordinates...); each record is a
  single request or a multi-turn conversation in which the concept arrives in a later turn, after
  benign ones, sometimes under a system prompt. Negatives also include benign chat and the other
  concepts' records.
- data/benign/{train,calibration,test}.jsonl: benign conversations from the chatterbot corpus
  (`chatterbot-corpus` on PyPI, BSD-3: 7,644 hand-written dialogues in 28 languages; the 11 in Latin
  script that the demo model reads), single- and multi-turn. `calibration.jsonl` is what `monitor calibrate` sets thresholds on: thousands of those
  chats, plus look-alike and talk-about families that no probe trains on or is tested on
  (`families.CALIBRATION`), since a threshold set on chit-chat alone sits below the hard negatives
  real traffic has. `train` feeds probe training and `test` the evaluation.
- data/eval/{single-turn,multi-turn}.jsonl: the three concepts' test splits again, cut into single
  requests and conversations with earlier turns: the two families `monitor eval` reports apart.

Every record is `{"messages": [...], "labels": {concept: 0|1}, "source": "<family>"}`. Whole families
go to one side of the split (about 30% held out for test), and the chatterbot corpus is split by
blocks of neighbouring dialogues, so test figures measure phrasings and topics no probe saw.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import families as F  # noqa: E402

ROOT = Path(__file__).resolve().parent
CONCEPTS = ("pii", "prompt_injection", "harmful_request")
CALIBRATION_REPS = 30  # records per held-out look-alike family in the calibration set
LOCALES = ["en_US", "en_GB", "en_IN", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR", "pl_PL"]
TEST_CARDS = ["4242 4242 4242 4242", "4111 1111 1111 1111", "5555 5555 5555 4444", "4000 0566 5566 5556",
              "3782 822463 10005", "6011 1111 1111 1117", "4000 0000 0000 0002"]


def stable(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def is_test(family: str) -> bool:
    """About 30% of families, chosen by name, are held out whole for the test split."""
    return stable(family) % 10 < 3


def split_of(family: str, negative: bool) -> str:
    """test (30% of families, by name), calibration (the negative families named in `families.CALIBRATION`:
    look-alikes and talk about a concept that no probe trains on, for `monitor calibrate`), or train."""
    if is_test(family):
        return "test"
    return "calibration" if negative and family.rsplit("/", 1)[-1] in F.CALIBRATION else "train"


class Fill:
    """Slot values: Faker's personal data in several locales, secrets, and look-alike identifiers."""

    def __init__(self, seed: int) -> None:
        from faker import Faker

        self.fake = Faker(LOCALES)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Each family draws from its own seed, so editing one family leaves every other record as it was."""
        self.fake.seed_instance(seed)
        self.rng = random.Random(seed)

    def _secret(self) -> str:
        r = self.rng
        alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        s = lambda n, a=alnum: "".join(r.choice(a) for _ in range(n))  # noqa: E731
        return r.choice(["sk-" + s(40), "sk-proj-" + s(44), "AKIA" + s(16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"),
                         "ghp_" + s(36), f"xoxb-{r.randint(10**10, 10**11)}-" + s(24), "AIza" + s(35),
                         "glpat-" + s(20), f"postgres://admin:{s(14)}@db.internal:5432/prod",
                         "sk_live_" + s(24), f"eyJhbGciOiJIUzI1NiJ9.{s(36)}.{s(43)}"])

    def values(self) -> dict[str, str]:
        r, f = self.rng, self.fake[self.rng.choice(LOCALES)]
        us = self.fake["en_US"]
        people = [self.fake[r.choice(LOCALES)] for _ in range(3)]
        card = us.credit_card_number()
        card = " ".join(card[i:i + 4] for i in range(0, len(card), 4)) if r.random() < 0.5 else card
        first = f.first_name()
        digits = lambda n: "".join(r.choice("0123456789") for _ in range(n))  # noqa: E731
        return {
            "name": f.name(), "first": first, "name2": people[1].name(), "name3": people[2].name(),
            "email": r.choice([f.free_email(), f.company_email(), f"{first.lower()}.{f.last_name().lower()}@{f.free_email_domain()}"]),
            "email2": people[1].free_email(), "phone": f.phone_number(), "phone3": people[2].phone_number(),
            "address": f.address().replace("\n", ", "), "city": f.city(), "card": card,
            "expiry": us.credit_card_expire(), "cvv": us.credit_card_security_code(), "ssn": us.ssn(),
            "iban": f.iban(), "dob": f.date_of_birth().isoformat(), "passport": us.passport_number(),
            "insurance": f"{r.choice('ABCHKMW')}{digits(9)}", "employee_id": f"E{digits(6)}", "user": f.user_name(),
            "password": f.password(length=r.randint(9, 14)), "password2": f.password(length=10), "secret": self._secret(),
            "attacker": f"collect@{us.domain_word()}-sync.test", "attacker_domain": f"{us.domain_word()}-cdn.test",
            # look-alikes: numbers and codes that identify things, not people
            "isbn13": us.isbn13(), "isbn13b": us.isbn13(), "isbn10": us.isbn10(),
            "order": r.choice([f"#{digits(7)}", f"ORD-{r.randint(2019, 2026)}-{digits(5)}", f"{digits(3)}-{digits(7)}-{digits(7)}"]),
            "sku": f"SKU-{us.lexify('??').upper()}-{digits(4)}", "sku2": f"{us.lexify('???').upper()}{digits(5)}",
            "sku3": f"{digits(2)}-{us.lexify('????').upper()}-{digits(3)}", "uuid": us.uuid4(),
            "sha": us.sha1()[:r.choice([7, 8, 10])], "sha_long": us.sha1(), "test_card": r.choice(TEST_CARDS),
            "lat": f"{us.latitude():.5f}", "lon": f"{us.longitude():.5f}", "lat2": f"{us.latitude():.5f}",
            "lon2": f"{us.longitude():.5f}", "version": f"{r.randint(0, 9)}.{r.randint(0, 30)}.{r.randint(0, 20)}",
            "version2": f"{r.randint(0, 9)}.{r.randint(0, 30)}", "tracking": r.choice([f"1Z{us.bothify('???###??#########').upper()}", f"JD{digits(18)}"]),
            "invoice": f"INV-{r.randint(2020, 2026)}-{digits(4)}", "flight": f"{us.lexify('??').upper()} {r.randint(100, 9999)}",
            "date": us.date_this_decade().isoformat(), "date2": us.date_this_decade().isoformat(),
            "n1": str(r.randint(2, 999)), "n2": str(r.randint(2, 99999)), "hex": us.hex_color(), "hex2": us.hex_color(),
            "serial": us.bothify("??##-####-??##").upper(), "ean": us.ean13(), "unix": str(r.randint(10**9, 1.8 * 10**9)),
            "famous": r.choice(F.FAMOUS),
        }


@dataclass
class Style:
    rng: random.Random

    def text(self, body: str) -> str:
        r = self.rng
        body = r.choice(F.PREFIXES) + body + r.choice(F.SUFFIXES)
        if r.random() < 0.2:
            ctx = r.choice(F.CONTEXT)
            body = f"{ctx} {body}" if r.random() < 0.5 else f"{body}\n\n{ctx}"
        if r.random() < 0.12:
            body = body.lower()
        if r.random() < 0.1:  # a typo or two, as people type
            for _ in range(r.randint(1, 2)):
                i = r.randrange(1, max(2, len(body) - 1))
                if body[i - 1].isalpha() and body[i].isalpha():
                    body = body[:i - 1] + body[i] + body[i - 1] + body[i + 1:]
        return body


class Composer:
    """Single requests and multi-turn conversations around one turn that carries (or not) the concept."""

    def __init__(self, seed: int, benign_pairs: list[tuple[str, str]]) -> None:
        self.rng = random.Random(seed)
        self.pairs = F.BENIGN_QA + benign_pairs

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def chat(self, turn: str) -> list[dict[str, str]]:
        r = self.rng
        msgs: list[dict[str, str]] = []
        if r.random() < 0.25:
            msgs.append({"role": "system", "content": r.choice(F.SYSTEM_PROMPTS)})
        shape = r.random()
        earlier = 0 if shape < 0.45 else r.choice([1, 1, 2, 3])
        for q, a in r.sample(self.pairs, earlier):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": Style(r).text(turn)})
        if earlier and r.random() < 0.2:  # the concept's turn answered, then a benign follow-up
            msgs += [{"role": "assistant", "content": "Sure, here you go."},
                     {"role": "user", "content": r.choice(F.FOLLOW_UPS)}]
        return msgs


def chatterbot_dialogues() -> dict[str, list[list[str]]]:
    """`<language>/<topic>` -> the corpus's dialogues (lists of alternating lines)."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data"
    out = {}
    for path in sorted(root.glob("*/*.yml")):
        if path.parent.name not in LANGUAGES:
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        dialogues = [[str(x) for x in d if x is not None] for d in data.get("conversations") or []]
        dialogues = [d for d in dialogues if len(d) >= 2 and all(s.strip() for s in d)]
        if dialogues:
            out[f"{path.parent.name}/{path.stem}"] = dialogues
    return out


# Languages of the corpus that the demo model reads; its CJK, Indic and other scripts it does not.
LANGUAGES = {"english", "spanish", "french", "german", "italian", "portuguese", "dutch", "swedish", "indonesian",
             "turkish", "hinglish"}


def benign_split(name: str) -> str:
    """A block of 20 neighbouring dialogues of a corpus file (neighbours share a sub-topic) goes whole to
    train (20%), calibration (60%) or test (20%)."""
    k = stable("benign:" + name) % 5
    return "train" if k == 0 else "test" if k == 1 else "calibration"


def english_pairs(dialogues: dict[str, list[list[str]]]) -> dict[str, list[tuple[str, str]]]:
    """The English dialogues' opening question and answer, by benign split (train, test): the earlier turns
    of multi-turn conversations come from the same side of the split as the conversation."""
    return {part: [(d[0], d[1]) for name, ds in dialogues.items() if name.startswith("english/")
                   for i, d in enumerate(ds) if benign_split(f"{name}#{i // 20}") == part] for part in ("train", "test")}


def benign_chats(dialogues: dict[str, list[list[str]]], seed: int) -> dict[str, list[dict]]:
    """Chats from the corpus: a dialogue as user/assistant turns; some chain two or three of a file."""
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {"train": [], "calibration": [], "test": []}
    for name, ds in dialogues.items():
        for start in range(0, len(ds), 20):
            block = f"{name}#{start // 20}"
            part = out[benign_split(block)]
            chats = ds[start:start + 20]
            for d in chats:  # each dialogue's opening question on its own: the shape of most requests
                msgs = [{"role": "system", "content": rng.choice(F.SYSTEM_PROMPTS)}] if rng.random() < 0.2 else []
                part.append({"messages": msgs + [{"role": "user", "content": d[0]}],
                             "labels": {c: 0 for c in CONCEPTS}, "source": f"chatterbot/{block}"})
            chats = list(chats)
            rng.shuffle(chats)
            i = 0
            while i < len(chats):  # and inside a conversation of two to four dialogues
                take = rng.choice([2, 3, 4])
                msgs = [{"role": "system", "content": rng.choice(F.SYSTEM_PROMPTS)}] if rng.random() < 0.2 else []
                for d in chats[i:i + take]:
                    d = d[:4][: len(d[:4]) // 2 * 2]  # whole question/answer pairs, so roles alternate
                    msgs += [{"role": "user" if j % 2 == 0 else "assistant", "content": line}
                             for j, line in enumerate(d)]
                msgs.pop()  # the prompt ends with the request the model is about to answer
                i += take
                part.append({"messages": msgs, "labels": {c: 0 for c in CONCEPTS}, "source": f"chatterbot/{block}"})
    return out


def main() -> None:
    dialogues = chatterbot_dialogues()
    benign = benign_chats(dialogues, seed=7)
    pairs = english_pairs(dialogues)
    fill = Fill(20261201)
    composers = {"train": Composer(1, pairs["train"]), "test": Composer(2, pairs["test"]),
                 "calibration": Composer(4, pairs["train"])}
    by_concept: dict[str, dict[str, list[dict]]] = {c: {"train": [], "test": []} for c in CONCEPTS}
    positives: dict[str, list[dict]] = {c: [] for c in CONCEPTS}
    tables = {"pii": (F.PII_POS, F.PII_NEG, 14, 12), "prompt_injection": (F.INJ_POS, F.INJ_NEG, 14, 12),
              "harmful_request": (F.HARM_POS, F.HARM_NEG, 14, 12)}
    for concept, (pos, neg, n_pos, n_neg) in tables.items():
        for label, table, reps in ((1, pos, n_pos), (0, neg, n_neg)):
            for family, phrasings in table.items():
                source = f"{concept}/{'pos' if label else 'neg'}/{family}"
                part = split_of(source, negative=not label)
                fill.reseed(stable(source))
                composers[part].reseed(stable(source) + 1)
                for k in range(reps if part != "calibration" else CALIBRATION_REPS):
                    text = phrasings[k % len(phrasings)].format(**fill.values())
                    rec = {"messages": composers[part].chat(text), "labels": {concept: label}, "source": source}
                    if part == "calibration":  # a look-alike of one concept is benign for every concept
                        benign["calibration"].append(rec | {"labels": {c: 0 for c in CONCEPTS}})
                        continue
                    by_concept[concept][part].append(rec)
                    if label:
                        positives[concept].append(rec)
    # Each concept's negatives also hold the other concepts' records (their look-alikes included:
    # an ISBN is no injection either), and benign chat.
    rng = random.Random(3)
    own = {c: {part: list(recs) for part, recs in by_concept[c].items()} for c in CONCEPTS}  # before any borrowing
    for concept in CONCEPTS:
        for other in CONCEPTS:
            if other == concept:
                continue
            for part in ("train", "test"):
                pool = [r for r in own[other][part] if not (concept == "pii" and "@" in json.dumps(r))]
                for r in rng.sample(pool, min(len(pool), 90 if part == "train" else 45)):
                    by_concept[concept][part].append({"messages": r["messages"], "labels": {concept: 0},
                                                      "source": f"other/{r['source']}"})
        for i, text in enumerate(F.BENIGN_REQUESTS):  # everyday requests to an assistant, 20 families
            source = f"requests/{i % 20}"
            part = split_of(source, negative=True)
            rec = {"messages": composers[part].chat(text), "labels": {concept: 0}, "source": source}
            if part == "calibration":
                if concept == CONCEPTS[0]:
                    benign["calibration"].append(rec | {"labels": {c: 0 for c in CONCEPTS}})
                continue
            by_concept[concept][part].append(rec)
        for part, n in (("train", 160), ("test", 120)):
            for r in rng.sample(benign[part], min(n, len(benign[part]))):
                by_concept[concept][part].append({"messages": r["messages"], "labels": {concept: 0}, "source": r["source"]})
    for concept in CONCEPTS:
        for part, recs in by_concept[concept].items():
            write(ROOT / "concepts" / concept / f"{part}.jsonl", recs, rng)
    for part, recs in benign.items():
        write(ROOT / "benign" / f"{part}.jsonl", recs, rng)
    # The test splits again, as the two families `monitor eval` reports apart: single requests, and
    # conversations with earlier turns (each record still labels only its own concept).
    for family, multi in (("single-turn", False), ("multi-turn", True)):
        recs = [r for c in CONCEPTS for r in by_concept[c]["test"]
                if (sum(m["role"] == "user" for m in r["messages"]) > 1) == multi]
        write(ROOT / "eval" / f"{family}.jsonl", recs, rng)


def write(path: Path, recs: list[dict], rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = list(recs)
    rng.shuffle(recs)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    pos = sum(1 for r in recs if any(r["labels"].values()))
    fams = len({r["source"] for r in recs})
    print(f"{path.relative_to(ROOT)}: {len(recs)} records, {pos} positive, {fams} families", flush=True)


if __name__ == "__main__":
    main()
