"""Each reader on a fixture in its published schema: exact field mapping, and malformed rows
counted by reason (fixtures are invented rows under tests/fixtures/)."""

import json
import os

import pytest

from fleming_jax.data import sources
from fleming_jax.data.records import QARecord

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def read(fmt, file, **options):
    return sources.read_source(fmt, os.path.join(FIX, file), **options)


def test_medqa_4_and_5_options_and_malformed_rows():
    records, report = read("medqa", "medqa.jsonl")
    assert [r.answer for r in records] == ["A", "B"]
    assert records[0].options == {"A": "Iron deficiency", "B": "Vitamin B12 deficiency",
                                  "C": "Thalassemia trait", "D": "Lead poisoning"}
    assert len(records[1].options) == 5 and records[1].options["B"] == "ECG"
    assert records[0].source == "medqa" and records[0].id == "medqa-0"
    assert records[0].meta == {"meta_info": "step1"}
    assert (report.read, report.kept) == (5, 2)
    assert report.dropped == {"answer_not_in_options": 1, "missing_question": 1, "missing_answer_idx": 1}
    assert report.examples["answer_not_in_options"].endswith("medqa.jsonl:3")


def test_medmcqa_hf_release_counts_cop_from_zero():
    records, report = read("medmcqa", "medmcqa_hf.jsonl")  # default cop_base=0
    assert [(r.id, r.answer) for r in records] == [("m-1", "A"), ("m-2", "B")]
    assert records[0].options == {"A": "Ethosuximide", "B": "Phenytoin", "C": "Carbamazepine",
                                  "D": "Phenobarbitone"}
    assert records[0].explanation == "Ethosuximide blocks T-type calcium channels."
    assert records[1].explanation is None
    assert records[0].meta == {"subject_name": "Pharmacology", "topic_name": "Antiepileptics",
                               "choice_type": "single"}
    assert report.dropped == {"answer_not_in_options": 1, "missing_cop": 1}  # cop=4 is off the end


def test_medmcqa_github_json_counts_cop_from_one_and_the_trap_shows():
    records, report = read("medmcqa", "medmcqa_github.json", cop_base=1)
    assert [(r.id, r.answer, r.options[r.answer]) for r in records] == [
        ("g-1", "A", "Ethosuximide"), ("g-2", "B", "Skin")]
    assert report.dropped == {"answer_not_in_options": 1}  # cop=0 cannot be 1-based
    # Read with the wrong base the same file shifts every answer by one option.
    wrong, _ = read("medmcqa", "medmcqa_github.json", cop_base=0)
    assert [(r.id, r.options[r.answer]) for r in wrong] == [
        ("g-1", "Phenytoin"), ("g-2", "Brain"), ("g-3", "Furosemide")]


def test_pubmedqa_original_dict_keyed_by_pmid_and_hf_rows():
    records, report = read("pubmedqa", "pubmedqa_ori.json")
    assert [(r.id, r.answer, r.options) for r in records] == [("10000001", "yes", None),
                                                              ("10000002", "maybe", None)]
    assert records[0].question == ("Context: We enrolled 120 adults aged over 65. Systolic pressure "
                                   "fell by 6 mmHg after 12 weeks.\n\nQuestion: Does daily walking "
                                   "lower resting blood pressure in older adults?")
    assert records[0].explanation == "Daily walking lowered systolic pressure."
    assert report.dropped == {"answer_not_yes_no_maybe": 1, "missing_final_decision": 1}
    hf, _ = read("pubmedqa", "pubmedqa_hf.jsonl", name="pqa_labeled")
    assert (hf[0].id, hf[0].answer, hf[0].source) == ("20000001", "no", "pqa_labeled")
    assert hf[0].question.startswith("Context: Prospective cohort")


def test_mmlu_keeps_medical_subjects():
    records, report = read("mmlu", "mmlu.jsonl")
    assert [(r.answer, r.options[r.answer], r.meta["subject"]) for r in records] == [
        ("A", "Scaphoid", "anatomy"), ("B", "60-100", "clinical_knowledge")]
    assert report.dropped == {"other_subject": 1, "answer_not_in_options": 1}
    everything, _ = read("mmlu", "mmlu.jsonl", subjects=["elementary_mathematics"])
    assert [r.options[r.answer] for r in everything] == ["4"]


def test_mmlu_pro_ten_options_letter_and_index_agree():
    records, report = read("mmlu_pro", "mmlu_pro.jsonl")
    assert [(r.id, r.answer, r.options[r.answer]) for r in records] == [
        ("101", "C", "Insulin"), ("102", "E", "Mitochondrial matrix")]
    assert len(records[0].options) == 10 and list(records[0].options)[-1] == "J"
    assert len(records[1].options) == 6  # "N/A" padding dropped
    assert report.dropped == {"other_category": 1, "answer_index_mismatch": 1}


def test_headqa_ra_is_the_one_based_answer_id():
    records, report = read("headqa", "headqa.jsonl")
    assert [(r.id, r.answer, r.options[r.answer]) for r in records] == [
        ("7", "C", "Intramuscular adrenaline")]
    assert report.dropped == {"answer_not_in_options": 1}


def test_medxpertqa_ten_options_and_choices_stripped_from_stem():
    records, report = read("medxpertqa", "medxpertqa.jsonl")
    r = records[0]
    assert (r.id, r.answer, r.options["B"], len(r.options)) == ("Text-1", "B", "Plasma free metanephrines", 10)
    assert r.question.endswith("Which test is best?") and "Answer Choices" not in r.question
    assert r.meta == {"medical_task": "Diagnosis", "body_system": "Endocrine", "question_type": "Reasoning"}
    assert report.dropped == {"answer_not_in_options": 1}


def test_careqa_cop_from_one():
    records, report = read("careqa", "careqa.jsonl")
    assert [(r.id, r.answer, r.options[r.answer]) for r in records] == [("c-1", "B", "Beta-lactams")]
    assert report.dropped == {"answer_not_in_options": 1}


def test_jmed_21_options():
    records, report = read("jmed", "jmed.jsonl")
    assert [(r.id, r.answer, r.options[r.answer]) for r in records] == [("j-1", "H", "Kawasaki disease")]
    assert len(records[0].options) == 21 and list(records[0].options)[-1] == "U"
    assert report.dropped == {"answer_not_in_options": 1}


def test_medbullets_csv_with_four_or_five_options():
    records, report = read("medbullets", "medbullets.csv")
    assert [(r.id, r.answer, r.options[r.answer], len(r.options)) for r in records] == [
        ("https://example.org/q1", "B", "Median", 5), ("https://example.org/q2", "B", "Hyperkalemia", 4)]
    assert records[0].explanation == "Carpal tunnel syndrome compresses the median nerve."
    assert report.dropped == {"answer_not_in_options": 1}
    assert report.examples["answer_not_in_options"].endswith("medbullets.csv:4")


def test_cmexam_options_string_and_cmb_option_dict():
    records, report = read("cmexam", "cmexam.csv")
    assert [(r.answer, r.options[r.answer]) for r in records] == [("A", "慢性失血")]
    assert list(records[0].options) == ["A", "B", "C", "D", "E"] and records[0].meta == {"language": "zh"}
    assert report.dropped == {"multiple_answers": 1}
    cmb, _ = read("cmexam", "cmb.json", name="cmb")
    assert [(r.answer, r.options[r.answer]) for r in cmb] == [("C", "硝普钠")]


def test_medkgqa_choices_and_graph_index():
    records, report = read("medkgqa", "medkgqa.jsonl", graph_path=os.path.join(FIX, "MedKgQA_graph.jsonl"))
    r = records[0]
    assert r.options == {"A": "Glucocerebrosidase", "B": "Hexosaminidase A", "C": "Sphingomyelinase",
                         "D": "Alpha-galactosidase A"}
    assert r.answer == "A" and r.meta["graph_idx"] == 1
    assert r.meta["kg_graph"]["nodes"] == ["Gaucher disease", "Glucocerebrosidase"]
    assert report.dropped == {"answer_not_in_options": 1}


def test_jsonl_in_our_schema():
    records, report = read("jsonl", "ours.jsonl", name="mine")
    assert [r.to_dict() for r in records] == [
        QARecord("o-1", "mine", "Which vitamin prevents rickets?", "A",
                 {"A": "Vitamin D", "B": "Vitamin C"}, meta={"difficulty": "Easy"}).to_dict(),
        QARecord("o-2", "mine", "Is aspirin an NSAID?", "yes").to_dict()]
    assert report.dropped == {"not_a_qa_record": 1}


def test_parquet_and_hf_dataset_on_disk_give_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(os.path.join(FIX, "medmcqa_hf.jsonl"))][:2]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "hf")
    from_parquet, _ = sources.read_source("medmcqa", str(tmp_path / "m.parquet"))
    from_disk, _ = sources.read_source("medmcqa", str(tmp_path / "hf"), split="validation")
    assert [r.to_dict() for r in from_parquet] == [r.to_dict() for r in from_disk]
    assert [r.answer for r in from_disk] == ["A", "B"]
    with pytest.raises(ValueError, match=r"no split 'train'; splits: \['validation'\]"):
        sources.read_source("medmcqa", str(tmp_path / "hf"))


def test_unknown_format_and_missing_file_name_what_to_do():
    with pytest.raises(ValueError, match="unknown source format 'medqa2'; formats: medqa, medmcqa"):
        sources.read_source("medqa2", "x.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        sources.read_source("medqa", "nope.jsonl")
