"""What if a detector's threshold were X: the console's answer over the recorded fires, checked against
the stored alert events and the verdicts a person gave."""

from __future__ import annotations

import pytest

from incident_factory import make_events
from test_console import CHATS, NOW, Site


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture()
def judged(tmp_path, tokenizer):
    corpus = [make_events(tokenizer, CHATS[k % 3][1], CHATS[k % 3][2], request_id=f"w-{k}", when=NOW) for k in range(9)]
    site = Site(tmp_path, f"sqlite:///{tmp_path}/incidents.sqlite", corpus)
    verdicts = {0: "true_positive", 1: "true_positive", 2: "false_positive", 3: "false_positive", 4: "unsure"}
    for k, v in verdicts.items():
        site.store.triage(corpus[k][1]["data"]["alert_ids"][0], "tom", "verdict", v, "")
    return site, corpus, verdicts


def test_a_candidate_threshold_keeps_the_fires_that_reach_it(judged):
    site, corpus, verdicts = judged
    # Each fire's final score, as the alert events carried it (the last revision of each alert).
    final = {}
    for alerts, _ in corpus:
        for a in alerts:
            d = a["data"]
            if d["revision"] >= final.get(d["alert_id"], (-1, 0))[0]:
                final[d["alert_id"]] = (d["revision"], d["score"])
    scores = {aid: s for aid, (_, s) in final.items()}
    by_k = {k: corpus[k][1]["data"]["alert_ids"][0] for k in range(9)}
    candidate = sorted(scores.values())[4]  # the median fire
    c = site.client(site.viewer)
    r = c.get(f"/api/detectors/pii-probe/what-if?threshold={candidate!r}")
    assert r.status_code == 200, r.text
    w = r.json()
    keeps = {aid for aid, s in scores.items() if s >= candidate}
    assert w["fires"] == 9 and w["still_firing"] == len(keeps) == 5 and w["current_threshold"] == 0.5
    assert {a["alert_id"] for a in w["alerts"] if a["fires"]} == keeps
    tp = [k for k, v in verdicts.items() if v == "true_positive"]
    fp = [k for k, v in verdicts.items() if v == "false_positive"]
    kept_tp = sum(by_k[k] in keeps for k in tp)
    kept_fp = sum(by_k[k] in keeps for k in fp)
    assert (w["true_positives"], w["false_positives"]) == (2, 2)
    assert (w["true_positives_kept"], w["false_positives_kept"]) == (kept_tp, kept_fp)
    assert w["recall"] == kept_tp / 2 and w["precision_now"] == 0.5
    assert w["precision"] == (kept_tp / (kept_tp + kept_fp) if kept_tp + kept_fp else None)
    assert not w["below_current"]
    page = c.get(f"/detectors/pii-probe?threshold={candidate!r}").text
    assert f'<td class="n" id="whatif-kept">{len(keeps)}</td>' in page and "whatif-below" not in page
    # Below the running threshold the store cannot say: the page says where to look instead.
    assert 'id="whatif-below"' in c.get("/detectors/pii-probe?threshold=0.1").text
    assert c.get("/detectors/pii-probe").status_code == 200  # the running threshold by default
    # The incident page links here.
    assert 'href="/detectors/pii-probe" id="whatif-link"' in c.get(f"/incidents/{by_k[0]}").text


def test_bad_candidates_and_unknown_detectors_are_named(judged):
    site, _, _ = judged
    c = site.client(site.viewer)
    r = c.get("/api/detectors/pii-probe/what-if?threshold=high")
    assert r.status_code == 400 and "threshold 'high' is not a number" in r.text
    r = c.get("/api/detectors/pii-probe/what-if?threshold=nan")
    assert r.status_code == 400 and "not a finite number" in r.text
    r = c.get("/detectors/no-such-detector")
    assert r.status_code == 404 and "no fire of detector" in r.text
    assert site.client().get("/detectors/pii-probe").status_code == 401
