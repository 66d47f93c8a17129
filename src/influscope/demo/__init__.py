"""The embedded demo: a tiny GPT-2 trained on Shakespeare with planted facts.

- :mod:`influscope.demo.facts` — invented entities and the facts planted about them
  (several languages, both word orders), with held-out queries.
- :mod:`influscope.demo.corpus` — Shakespeare chunks mixed with the planted facts.
- :mod:`influscope.demo.train` — byte-level BPE tokenizer and a small GPT-2 trained on the corpus
  (imports ``torch`` and ``transformers``, so it is not imported here).
"""

from influscope.demo.corpus import DemoCorpus, build_demo_corpus, free_text_queries
from influscope.demo.facts import PlantedFact, make_facts, make_queries, make_training_records

__all__ = [
    "DemoCorpus",
    "PlantedFact",
    "build_demo_corpus",
    "free_text_queries",
    "make_facts",
    "make_queries",
    "make_training_records",
]
