"""Knowledge-graph loaders on tiny fixture files (HPO release files, PrimeKG kg.csv, triples)."""

import os

import pytest

from fleming_jax.data import kg as kglib

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def test_hpo_files_give_diseases_phenotypes_frequencies_genes_and_hierarchy():
    g = kglib.load_hpo(os.path.join(FIX, "hpo"))
    assert g.of_type("disease") == ["OMIM:100001", "ORPHA:2"]  # C has 1 phenotype, DECIPHER not read
    assert g.name("OMIM:100001") == "Disease A"
    freqs = {p: g.edge("OMIM:100001", "has_phenotype", p)["frequency"] for p in g.out("OMIM:100001", "has_phenotype")}
    assert freqs == {"HP:0001250": 0.9, "HP:0000518": 0.5, "HP:0001249": None}  # NOT and aspect I skipped
    assert {p: g.edge("ORPHA:2", "has_phenotype", p)["frequency"] for p in g.out("ORPHA:2", "has_phenotype")} == {
        "HP:0001250": 0.45, "HP:0000518": 0.17, "HP:0001249": None}  # "excluded" (0%) skipped
    assert g.out("OMIM:100001", "associated_gene") == ["NCBIGene:10"] and g.name("NCBIGene:10") == "GENEA"
    assert sorted(g.into("HP:0001250", "has_phenotype")) == ["OMIM:100001", "ORPHA:2"]
    assert g.ancestors("HP:0000518") == {"HP:0000478", "HP:0000118", "HP:0000001"}
    assert "HP:0000505" not in g.entities  # only phenotypes in use and their ancestors
    assert g.stats() == {"entities": {"disease": 2, "gene": 2, "phenotype": 7},
                         "relations": {"associated_gene": 2, "has_phenotype": 6, "is_a": 6}}
    assert g.degree("OMIM:100001") == 4


def test_hpo_subset_is_seeded_and_graph_round_trips(tmp_path):
    hpo = os.path.join(FIX, "hpo")
    one = kglib.load_hpo(hpo, max_diseases=1, seed=3)
    assert one.of_type("disease") == kglib.load_hpo(hpo, max_diseases=1, seed=3).of_type("disease")
    assert len(one.of_type("disease")) == 1
    assert len(kglib.load_hpo(hpo, min_phenotypes=1).of_type("disease")) == 3
    full = kglib.load_hpo(hpo)
    full.save(tmp_path / "kg.json.gz")
    back = kglib.KG.load(tmp_path / "kg.json.gz")
    assert back.entities == full.entities and sorted(back.edges()) == sorted(full.edges())


@pytest.mark.parametrize("text, value", [("HP:0040281", 0.9), ("3/4", 0.75), ("45%", 0.45), ("", None),
                                         ("-", None), ("0/0", None)])
def test_frequency_forms(text, value):
    assert kglib.parse_frequency(text) == value


def test_primekg_keeps_one_direction_of_each_edge_and_adds_drugs():
    g, skipped = kglib.load_primekg(os.path.join(FIX, "primekg.csv"))
    assert g.into("MONDO:5044", "indication") == ["DrugBank:DB00001"]
    assert g.out("DrugBank:DB00001", "contraindication") == ["MONDO:5090"]
    assert g.out("DrugBank:DB00001", "side_effect") == ["HPO:0001892"]
    assert g.entities["HPO:0001892"].type == "phenotype" and g.entities["NCBI:2147"].type == "gene"
    assert g.out("MONDO:5044", "associated_gene") == ["NCBI:2147"]
    assert g.stats()["relations"] == {"associated_gene": 1, "contraindication": 1, "has_phenotype": 1,
                                      "indication": 1, "side_effect": 1}
    assert skipped == {"indication": 1, "contraindication": 1, "drug_drug": 1}


def test_triples_tsv_and_bad_headers(tmp_path):
    g = kglib.load_triples(os.path.join(FIX, "triples.tsv"))
    assert g.out("Marfan syndrome", "associated_gene") == ["FBN1"]
    assert g.entities["Arachnodactyly"].type == "phenotype"
    assert g.entities["Abnormality of the fingers"].type == "entity"
    bad = tmp_path / "bad.tsv"
    bad.write_text("subject\tpredicate\tobject\n")
    with pytest.raises(ValueError, match=r"bad.tsv: header lacks \['head', 'relation', 'tail'\]"):
        kglib.load_triples(str(bad))


def test_edges_need_known_entities():
    g = kglib.KG()
    g.add_entity("a", "disease", "A")
    with pytest.raises(KeyError, match="unknown entity b"):
        g.add_edge("a", "has_phenotype", "b")
