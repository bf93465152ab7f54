"""Knowledge-graph-guided question synthesis (RODS): sample a 1-3 hop reasoning path around
a disease, mask one node, and ask for it as a multiple-choice question.

Path types (`PATH_TYPES`; the drug ones only when the graph has drugs):

    phenotypes_to_disease   findings --has_phenotype^-1--> disease              1 hop
    gene_to_phenotype       gene <--associated_gene-- disease --> phenotype     2 hops
    phenotypes_to_gene      findings -> disease --associated_gene--> gene       2 hops
    allelic_disorder        findings -> disease -> gene <-- other OMIM disease  3 hops
    disease_to_drug         disease <--indication-- drug                        1 hop
    phenotypes_to_drug      findings -> disease <--indication-- drug            2 hops
    drug_contraindication   disease <--indication-- drug --contraindication--> condition
                            (asks for the drug)                                 2 hops

"Correct by the graph": a disease has a finding F when it is annotated with F or with a
descendant of F (`is_a`); a gene/drug option is correct when some disease that has all
the given findings links to it; an `allelic_disorder` option is correct when it shares a
gene with a disease that has all the findings (options that have all the findings
themselves are never distractors, they could be the patient's condition). Distractors are competitors that share most given findings
(or hierarchy siblings of the answer phenotype) and are checked NOT to be correct.
Anchors are drawn with weight 1 / ((1 + mentions in curated text) * sqrt(1 + degree)), so
rare, little-mentioned diseases come first.

`meta` of a synthesised record (the KG teacher reads `kg_path`):

    path_type: str, hops: int, option_ids: {letter: entity id},
    kg_path: {"nodes": [{"id", "name", "type"}, ...],               # every node on the path
              "edges": [{"head": id, "relation": str, "tail": id}, ...],  # as in the KG
              "answer": id}                                          # the masked node
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections import Counter
from typing import Callable

from fleming_jax.data.kg import KG
from fleming_jax.data.quality import normalize
from fleming_jax.data.records import QARecord
from fleming_jax.data.sources import LETTERS

TEMPLATES = {
    "phenotypes_to_disease": ["A patient presents with {findings}. What is the most likely diagnosis?",
                              "Which disorder is characterised by {findings}?",
                              "A child is evaluated for {findings}. Which diagnosis fits best?"],
    "gene_to_phenotype": ["A pathogenic variant in {gene} causes an inherited disorder. Which finding is "
                          "a feature of that disorder?",
                          "Which finding is expected in a disorder caused by variants in {gene}?"],
    "phenotypes_to_gene": ["A patient presents with {findings}. Variants in which gene most likely "
                           "cause this condition?",
                           "Genetic testing is ordered for a patient with {findings}. Which gene is "
                           "most likely involved?"],
    "allelic_disorder": ["A patient presents with {findings}. Which other disorder is caused by variants "
                         "in the same gene as this condition?",
                         "Which disorder is allelic to the condition of a patient with {findings}?"],
    "disease_to_drug": ["Which drug is indicated for {disease}?",
                        "A patient is diagnosed with {disease}. Which medication is indicated?"],
    "phenotypes_to_drug": ["A patient presents with {findings}. Which drug is indicated for the most "
                           "likely diagnosis?"],
    "drug_contraindication": ["A patient with {disease} also has {condition}. Which drug for "
                              "{disease} is contraindicated?",
                              "Which treatment for {disease} must be avoided in a patient who also "
                              "has {condition}?"],
}
HOPS = {"phenotypes_to_disease": 1, "gene_to_phenotype": 2, "phenotypes_to_gene": 2,
        "allelic_disorder": 3, "disease_to_drug": 1, "phenotypes_to_drug": 2, "drug_contraindication": 2}
DRUG_TYPES = ("disease_to_drug", "phenotypes_to_drug", "drug_contraindication")


@dataclasses.dataclass
class SynthConfig:
    num_questions: int = 2000
    num_options: int = 4
    min_findings: int = 3
    max_findings: int = 5
    seed: int = 0
    # relative weights of the path types; those the graph cannot support are left out
    path_types: dict = dataclasses.field(default_factory=lambda: {
        "phenotypes_to_disease": 4, "gene_to_phenotype": 2, "phenotypes_to_gene": 2,
        "allelic_disorder": 1, "disease_to_drug": 1, "phenotypes_to_drug": 1, "drug_contraindication": 1})


@dataclasses.dataclass
class Draft:
    """A path before it becomes a question: who answers it, who may be a distractor."""

    fields: dict  # template fields
    answer: str
    pool: list[str]  # distractor candidates, best first
    correct: Callable[[str], bool]
    nodes: list[str]
    edges: list[tuple[str, str, str]]


class Synthesizer:
    """Holds the graph and the caches the path builders share."""

    def __init__(self, kg: KG, mentions: Counter | None = None):
        self.kg = kg
        self._closure: dict[str, set[str]] = {}
        self.diseases = [d for d in kg.of_type("disease") if kg.out(d, "has_phenotype")]
        self.drugs = kg.of_type("drug")
        self.genes = kg.of_type("gene")
        mentions = mentions or Counter()
        self.weights = [1 / ((1 + mentions[d]) * math.sqrt(1 + kg.degree(d))) for d in self.diseases]

    # ------------------------------------------------ graph facts
    def findings_of(self, disease: str) -> set[str]:
        """Annotated phenotypes and all their ancestors: what `disease` is said to have."""
        if disease not in self._closure:
            closure = set()
            for p in self.kg.out(disease, "has_phenotype"):
                closure |= {p} | self.kg.ancestors(p)
            self._closure[disease] = closure
        return self._closure[disease]

    def has_all(self, disease: str, findings: list[str]) -> bool:
        return set(findings) <= self.findings_of(disease)

    def competitors(self, findings: list[str], exclude: str, rng: random.Random) -> list[str]:
        """Diseases sharing the most of `findings` (ties shuffled), then random ones."""
        shared = Counter(d for f in findings for d in self.kg.into(f, "has_phenotype") if d != exclude)
        ranked = sorted(shared, key=lambda d: (-shared[d], rng.random()))
        return ranked + rng.sample(self.diseases, min(20, len(self.diseases)))

    def pick_findings(self, disease: str, rng: random.Random, lo: int, hi: int) -> list[str] | None:
        """lo..hi of the disease's phenotypes, favouring frequent and specific ones, none an
        ancestor of another (that would only repeat it)."""
        phenos = self.kg.out(disease, "has_phenotype")
        if len(phenos) < lo:
            return None
        def score(p):
            freq = self.kg.edge(disease, "has_phenotype", p).get("frequency")
            return (0.5 if freq is None else freq) / math.log(2 + len(self.kg.into(p, "has_phenotype")))
        order = sorted(phenos, key=lambda p: -score(p) * rng.random())
        chosen, want = [], rng.randint(lo, hi)
        for p in order:
            anc = self.kg.ancestors(p)
            if not any(p in self.kg.ancestors(c) or c in anc for c in chosen):
                chosen.append(p)
            if len(chosen) == want:
                break
        return chosen if len(chosen) >= lo else None

    # ------------------------------------------------ path builders: anchor disease -> Draft
    def phenotypes_to_disease(self, d, rng, cfg):
        findings = self.pick_findings(d, rng, cfg.min_findings, cfg.max_findings)
        if findings is None:
            return None
        return Draft({"findings": findings}, d, self.competitors(findings, d, rng),
                     lambda x: self.kg.entities[x].type == "disease" and self.has_all(x, findings),
                     findings + [d], [(d, "has_phenotype", f) for f in findings])

    def gene_to_phenotype(self, d, rng, cfg):
        genes = self.kg.out(d, "associated_gene")
        if not genes:
            return None
        gene = rng.choice(sorted(genes))
        answer = self.pick_findings(d, rng, 1, 1)
        if answer is None:
            return None
        answer = answer[0]
        gene_diseases = self.kg.into(gene, "associated_gene")
        siblings = [s for parent in self.kg.out(answer, "is_a") for s in self.kg.into(parent, "is_a")]
        others = [p for c in self.competitors([answer], d, rng)[:30] for p in self.kg.out(c, "has_phenotype")]
        return Draft({"gene": gene}, answer, rng.sample(siblings, len(siblings)) + others,
                     lambda x: self.kg.entities[x].type == "phenotype"
                     and any(self.has_all(g, [x]) for g in gene_diseases),
                     [gene, d, answer], [(d, "associated_gene", gene), (d, "has_phenotype", answer)])

    def phenotypes_to_gene(self, d, rng, cfg):
        genes = self.kg.out(d, "associated_gene")
        findings = self.pick_findings(d, rng, cfg.min_findings, cfg.max_findings)
        if not genes or findings is None:
            return None
        gene = rng.choice(sorted(genes))
        pool = [g for c in self.competitors(findings, d, rng) for g in self.kg.out(c, "associated_gene")]
        return Draft({"findings": findings}, gene, pool + rng.sample(self.genes, min(20, len(self.genes))),
                     lambda x: any(self.has_all(c, findings) for c in self.kg.into(x, "associated_gene")),
                     findings + [d, gene],
                     [(d, "has_phenotype", f) for f in findings] + [(d, "associated_gene", gene)])

    def allelic_disorder(self, d, rng, cfg):
        # OMIM gives each distinct phenotype of a gene its own entry, so two OMIM entries of one
        # gene are different disorders (an ORPHA entry may be the same disease under another id).
        findings = self.pick_findings(d, rng, cfg.min_findings, cfg.max_findings)
        if not d.startswith("OMIM:") or findings is None:
            return None
        pairs = sorted((g, o) for g in self.kg.out(d, "associated_gene")
                       for o in self.kg.into(g, "associated_gene")
                       if o != d and o.startswith("OMIM:") and not self.has_all(o, findings))
        if not pairs:
            return None
        gene, other = rng.choice(pairs)

        def correct(x):
            return self.kg.entities[x].type == "disease" and (self.has_all(x, findings) or any(
                self.has_all(c, findings) for g in self.kg.out(x, "associated_gene")
                for c in self.kg.into(g, "associated_gene")))

        return Draft({"findings": findings}, other, self.competitors(findings, d, rng), correct,
                     findings + [d, gene, other], [(d, "has_phenotype", f) for f in findings]
                     + [(d, "associated_gene", gene), (other, "associated_gene", gene)])

    def _drug_pool(self, diseases, rng):
        return [x for c in diseases for x in self.kg.into(c, "indication")] + \
            rng.sample(self.drugs, min(20, len(self.drugs)))

    def disease_to_drug(self, d, rng, cfg):
        drugs = self.kg.into(d, "indication")
        if not drugs:
            return None
        drug = rng.choice(sorted(drugs))
        competitors = self.competitors(self.kg.out(d, "has_phenotype")[:5], d, rng)
        return Draft({"disease": d}, drug, self._drug_pool(competitors, rng),
                     lambda x: self.kg.edge(x, "indication", d) is not None,
                     [d, drug], [(drug, "indication", d)])

    def phenotypes_to_drug(self, d, rng, cfg):
        drugs = self.kg.into(d, "indication")
        findings = self.pick_findings(d, rng, cfg.min_findings, cfg.max_findings)
        if not drugs or findings is None:
            return None
        drug = rng.choice(sorted(drugs))
        return Draft({"findings": findings}, drug, self._drug_pool(self.competitors(findings, d, rng), rng),
                     lambda x: any(self.has_all(c, findings) for c in self.kg.out(x, "indication")),
                     findings + [d, drug],
                     [(d, "has_phenotype", f) for f in findings] + [(drug, "indication", d)])

    def drug_contraindication(self, d, rng, cfg):
        pairs = sorted((x, c) for x in self.kg.into(d, "indication")
                       for c in self.kg.out(x, "contraindication") if c != d)
        if not pairs:
            return None
        drug, condition = rng.choice(pairs)
        return Draft({"disease": d, "condition": condition}, drug,
                     self.kg.into(d, "indication") + self._drug_pool([], rng),
                     lambda x: self.kg.edge(x, "indication", d) is not None
                     and self.kg.edge(x, "contraindication", condition) is not None,
                     [d, drug, condition], [(drug, "indication", d), (drug, "contraindication", condition)])

    # ------------------------------------------------ draft -> record
    def to_record(self, draft: Draft, path_type: str, rng: random.Random, cfg: SynthConfig,
                  index: int) -> QARecord | None:
        """The MCQ, or None when too few distractors survive the graph check."""
        names = {normalize(self.kg.name(draft.answer))}
        distractors = []
        for x in draft.pool:
            key = normalize(self.kg.name(x))
            if key not in names and not draft.correct(x):
                names.add(key)
                distractors.append(x)
                if len(distractors) == cfg.num_options - 1:
                    break
        else:
            return None
        ids = [draft.answer] + distractors
        rng.shuffle(ids)
        letters = LETTERS[:len(ids)]
        fields = {k: _phrase([self.kg.name(x) for x in v]) if isinstance(v, list) else self.kg.name(v)
                  for k, v in draft.fields.items()}
        question = rng.choice(TEMPLATES[path_type]).format(**fields)
        path = {"nodes": [dataclasses.asdict(self.kg.entities[n]) for n in draft.nodes],
                "edges": [{"head": h, "relation": r, "tail": t} for h, r, t in draft.edges],
                "answer": draft.answer}
        return QARecord(f"kg-{cfg.seed}-{index}", "kg_synthesis", question,
                        letters[ids.index(draft.answer)],
                        {letter: self.kg.name(x) for letter, x in zip(letters, ids)},
                        meta={"path_type": path_type, "hops": HOPS[path_type], "kg_path": path,
                              "option_ids": dict(zip(letters, ids))})


def _phrase(items: list[str]) -> str:
    """"a, b and c", each lower-cased unless it starts with an acronym."""
    items = [s if re.match(r"^[A-Z0-9]{2}", s) else s[:1].lower() + s[1:] for s in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def available_path_types(kg: KG, cfg: SynthConfig) -> dict[str, float]:
    has_drugs = bool(kg.of_type("drug"))
    return {t: w for t, w in sorted(cfg.path_types.items()) if w > 0 and (has_drugs or t not in DRUG_TYPES)}


def synthesize(kg: KG, cfg: SynthConfig = SynthConfig(), mentions: Counter | None = None,
               rewrite: Callable[[str], str] | None = None, progress: Callable[[str], None] = print
               ) -> tuple[list[QARecord], Counter]:
    """`cfg.num_questions` distinct MCQs (fewer if the graph runs out) and the attempts that
    failed, by reason. Deterministic for a given graph, config and `mentions`. `rewrite`
    (e.g. a teacher model) may reword each stem; options and answer stay as built."""
    rng = random.Random(cfg.seed)
    synth = Synthesizer(kg, mentions)
    types = available_path_types(kg, cfg)
    if not synth.diseases or not types:
        raise ValueError("the knowledge graph has no diseases with phenotypes to synthesise from")
    records, failed, seen = [], Counter(), set()
    for attempt in range(20 * cfg.num_questions):
        if len(records) == cfg.num_questions:
            break
        path_type = rng.choices(list(types), weights=list(types.values()))[0]
        anchor = rng.choices(synth.diseases, weights=synth.weights)[0]
        draft = getattr(synth, path_type)(anchor, rng, cfg)
        if draft is None:
            failed[f"{path_type}:no_path"] += 1
            continue
        key = (path_type, str(sorted(map(str, draft.fields.values()))))  # ask each thing once
        if key in seen:
            failed[f"{path_type}:repeat"] += 1
            continue
        record = synth.to_record(draft, path_type, rng, cfg, len(records))
        if record is None:
            failed[f"{path_type}:too_few_distractors"] += 1
            continue
        if rewrite is not None:
            record.question = rewrite(record.question).strip() or record.question
        seen.add(key)
        records.append(record)
        if len(records) % 500 == 0:
            progress(f"synthesised {len(records)}/{cfg.num_questions} questions")
    return records, failed


def reasoning(kg_path: dict) -> str:
    """A plain chain of facts along the path, for a KG-grounded chain of thought.

    Consecutive edges with the same head and relation make one sentence ("X presents with
    a, b and c."): the facts stay complete while the trace stays short, which matters for a
    small model trained on it.
    """
    names = {n["id"]: n["name"] for n in kg_path["nodes"]}
    verbs = {"has_phenotype": "presents with", "associated_gene": "is associated with variants in",
             "indication": "is indicated for", "contraindication": "is contraindicated in",
             "is_a": "is a kind of", "side_effect": "can cause"}
    groups: list[tuple[str, str, list[str]]] = []
    for e in kg_path["edges"]:
        if groups and groups[-1][:2] == (e["head"], e["relation"]):
            groups[-1][2].append(names[e["tail"]])
        else:
            groups.append((e["head"], e["relation"], [names[e["tail"]]]))
    lines = [f"{names[head]} {verbs.get(relation, relation.replace('_', ' '))} {_phrase(tails)}."
             for head, relation, tails in groups]
    return "\n".join(lines + [f"So the answer is {names[kg_path['answer']]}."])


def option_check(options: dict[str, str], answer: str) -> str:
    """One line per option, in order, with the graph's verdict ("D. Foo syndrome: yes").

    The step a reader takes from the entity the path reaches to the option letter: a small
    model that names the right entity still has to find which letter holds it, and this
    spells that step out (the distractors are graph-checked not to fit).
    """
    return "\n".join(f"{letter}. {text}: {'yes' if letter == answer else 'no'}" for letter, text in options.items())
