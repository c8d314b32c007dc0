"""`monitor features search`: from example conversations to the SAE features that mean the concept, and a
detector draft in shadow. On the demo model, its SAE and the project's own data (not the evaluation's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from monitor.cli import main
from monitor.config import load_config
from monitor.offline.evaluate import auroc
from monitor.offline.features import column_aurocs, read_explanations

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy/local/monitor.yaml"
DEMO_PII_FEATURE = yaml.safe_load((ROOT / "detectors/pii_sae_feature.yaml").read_text())["inputs"][0]["feature"]


def lines(path: Path, keep) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> tuple[Path, Path]:
    """The project's pii training split, as a team would bring its examples: 364 PII requests; 1,602
    negatives, its look-alikes (order numbers, dates, tracking codes) and ordinary chats. (Rows are read
    once through the model, ~2 minutes on 2 cores, then cached by content.)"""
    d = tmp_path_factory.mktemp("examples")
    pii = ROOT / "data/concepts/pii/train.jsonl"
    pos = lines(pii, lambda r: r["labels"].get("pii") == 1)
    neg = lines(pii, lambda r: r["labels"].get("pii") == 0) + lines(ROOT / "data/benign/train.jsonl", lambda r: True)
    (d / "pos.jsonl").write_text("\n".join(pos) + "\n")
    (d / "neg.jsonl").write_text("\n".join(neg) + "\n")
    return d / "pos.jsonl", d / "neg.jsonl"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["features", "search", "--config", str(CONFIG), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_search_finds_the_demo_pii_feature_and_drafts_a_shadow_detector(examples, model_dir, tmp_path, capsys):
    pos, neg = examples
    pack = tmp_path / "pack"
    code, out, err = run(capsys, "--sae", "demo-l15", "--positive", str(pos), "--negative", str(neg),
                         "--model", str(model_dir), "--query", "mail", "--write-pack", str(pack), "--concept", "pii",
                         "--report", str(tmp_path / "report"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    top = [h["feature"] for h in doc["top"]]
    # The feature the shipped pack watches is among the 20 listed of 4,096 (it was chosen on bfloat16 rows,
    # where it ranked first; on these float32 rows it is 16th, behind other digit and e-mail features).
    assert DEMO_PII_FEATURE in top, top
    assert doc["top"][0]["auroc"] >= 0.9
    demo = next(h for h in doc["top"] if h["feature"] == DEMO_PII_FEATURE)
    assert demo["auroc"] >= 0.9 and demo["active_positive"] > 3 * demo["active_negative"]
    best = doc["top"][0]
    assert doc["positives"] == 364 and doc["negatives"] == 1602
    assert any("[" in c for c in best["contexts"])  # the strongest tokens, in context
    assert doc["matched"] and all("mail" in h["explanation"].lower() for h in doc["matched"])
    assert (tmp_path / "report/separation.png").stat().st_size > 10_000
    # The draft: a valid pack, in shadow, reading the chosen feature, thresholded on the negatives.
    (draft,) = doc["pack"]
    spec = yaml.safe_load(Path(draft).read_text())
    assert spec["mode"] == "shadow" and spec["concept"] == "pii" and spec["scope"] == "prompt"
    assert spec["inputs"] == [{"sae": "demo-l15", "feature": doc["matched"][0]["feature"], "weight": 1.0}]
    assert "calibration" not in spec and "provisional" in spec["description"]
    loaded = load_config(CONFIG, detectors=[pack])  # the draft loads against the config's SAE
    assert [d.spec.mode for d in loaded.detectors] == ["shadow"]


def test_bad_input_is_named(examples, tmp_path, capsys):
    pos, neg = examples
    code, _, err = run(capsys, "--sae", "demo-l99", "--positive", str(pos), "--negative", str(neg))
    assert code == 2 and "--sae 'demo-l99' is not an SAE of" in err and "demo-l15" in err
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(neg.read_text().splitlines()[:3]) + "\n")
    code, _, err = run(capsys, "--sae", "demo-l15", "--positive", str(pos), "--negative", str(few))
    assert code == 2 and "3 negative conversation(s)" in err and "at least 5" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run(capsys, "--sae", "demo-l15", "--positive", str(empty), "--negative", str(neg))
    assert code == 2 and "no records" in err
    wrong = tmp_path / "explanations.json"
    wrong.write_text(json.dumps([{"feature": 3, "text": "emails"}]))
    code, _, err = run(capsys, "--sae", "demo-l15", "--positive", str(pos), "--negative", str(neg),
                       "--explanations", str(wrong))
    assert code == 2 and "is not a Neuronpedia explanation" in err
    code, _, err = run(capsys, "--sae", "demo-l15", "--positive", str(pos), "--negative", str(neg),
                       "--write-pack", str(tmp_path / "p"))
    assert code == 2 and "--write-pack needs --concept" in err


def test_neuronpedia_exports_are_read(tmp_path):
    (tmp_path / "np.json").write_text(json.dumps([
        {"modelId": "gemma-2-2b", "layer": "12-gemmascope-res-16k", "index": "21", "description": "email addresses"},
        {"modelId": "gemma-2-2b", "layer": "12-gemmascope-res-16k", "index": "21", "description": "a second opinion"},
        {"modelId": "gemma-2-2b", "layer": "12-gemmascope-res-16k", "index": "7", "description": "dates"}]))
    assert read_explanations(tmp_path / "np.json") == {21: "email addresses", 7: "dates"}
    (tmp_path / "np.jsonl").write_text('{"index": 3, "description": "phone numbers"}\n{"index": "4", "description": "x"}\n')
    assert read_explanations(tmp_path / "np.jsonl") == {3: "phone numbers", 4: "x"}


def test_every_columns_auroc_is_the_evaluations():
    rng = np.random.default_rng(0)
    pos, neg = rng.exponential(2.0, (30, 5)), rng.exponential(1.0, (40, 5))
    pos[:, 2] = 0.0  # ties: a feature never active
    neg[:, 2] = 0.0
    got = column_aurocs(pos, neg)
    assert np.allclose(got, [auroc(pos[:, j], neg[:, j]) for j in range(5)])
    assert got[2] == 0.5
