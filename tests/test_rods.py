"""The synthesize task end to end on the bundled curated fixtures and the HPO graph."""

import json
import os
import subprocess
import sys

from fleming_jax.data.records import QARecord, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthesize_command_runs_offline_and_reports(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, "main.py", "--config=configs/synthesize.py",
                             f"--workdir={tmp_path}", "--config.synthesis.num_questions=300",
                             "--config.kg.max_diseases=600"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# RODS data report" in result.stdout
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    # The planted problems in data/curated/, counted by hand.
    assert report["sources"]["medqa"]["read"] == 17 and report["sources"]["medqa"]["kept"] == 12
    assert report["sources"]["medqa"]["dropped"] == {
        "answer_not_in_options": 1, "contaminated:medqa_test": 1, "duplicate": 1,
        "duplicate_options": 1, "near_duplicate": 1}
    assert report["sources"]["medmcqa"]["dropped"] == {"answer_not_in_options": 1, "encoding_debris": 1}
    pubmedqa = report["sources"]["pubmedqa"]
    assert (pubmedqa["read"], pubmedqa["kept"], pubmedqa["dropped"]) == (7, 6, {"missing_final_decision": 1})
    assert pubmedqa["examples"]["missing_final_decision"].endswith("pubmedqa.json key 90000007")
    assert report["decontamination"] == {"medqa_test": 1}
    synth = report["synthesis"]
    assert synth["requested"] == 300 and 290 <= synth["kept"] <= 300
    assert sum(synth["path_types"].values()) == sum(synth["hops"].values()) == synth["kept"]
    cov = report["coverage"]
    assert cov["curated+synthetic"]["disease"] > 10 * max(1, cov["curated"]["disease"])

    train = [QARecord.from_dict(d) for d in read_jsonl(tmp_path / "train.jsonl")]
    val = [QARecord.from_dict(d) for d in read_jsonl(tmp_path / "validation.jsonl")]
    assert len(train) + len(val) == sum(s["kept"] for s in report["sources"].values())
    assert report["splits"] == {"validation": len(val), "train": len(train)}
    assert not {r.id for r in train} & {r.id for r in val}
    assert {r.source for r in train} == {"medqa", "medmcqa", "pubmedqa", "kg_synthesis"}
    assert os.path.exists(tmp_path / "report.md")
