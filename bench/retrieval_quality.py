"""Retrieval quality on the project's labelled questions: dense vs hybrid vs hybrid
with follow-ups rewritten, for the offline embedder and the real local model.

Run: ``python -m bench.retrieval_quality [--embedder offline|local|both]``
(``local`` needs ``make local``).

``tests/data/retrieval_questions.json`` (the tuning set) holds questions over the two courses
(``courses/demo``, ``courses/networking``), each labelled with the one topic that
answers it, some of them built around an exact term (an error code, a port
number); and follow-ups, each with the learner's earlier question(s), the topic
that answers it and how a careful person would rewrite it.
``tests/data/retrieval_questions_heldout.json`` holds 64 more, written by a
separate author who had seen neither the tuning questions nor this code: the
defaults are chosen on the tuning set and checked on the held-out one. Both courses are
indexed in a throwaway database (``bench/courses.py``) and every question goes
through the service's own steps: the canonical question (``rag/answering/rewrite.py``),
the embedding, and :func:`rag.answering.search.search_chunks` with ``TOP_K`` chunks.

Measured per embedder and mode:

* ``top1``: the expected topic is the first chunk's topic;
* ``recall@5``: it is among the topics of the first 5 chunks;
* ``cited_first`` / ``cited_any``: the prompt built from those chunks answered
  by the offline provider's extractive model, then cut to the sources the
  answer cites (``rag.answering.prompts.cited_only``): the expected topic is the first
  citation / among the citations. (A real chat model chooses its citations
  differently; this measures what retrieval hands it.)

Modes: ``dense`` (HNSW alone), ``rrf`` (HNSW and full-text search fused by
reciprocal rank), ``hybrid`` (the two fused by a convex combination of scores, the
default), and for follow-ups also ``hybrid+rewrite`` (rewritten by the rules, as
the offline provider does) and ``hybrid+human`` (the labelled rewrite: what a
model rewrite could reach at best). Prints a table; JSON in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict
from typing import Any

import msgspec

from bench import write_result
from bench.courses import (
    HELDOUT_RETRIEVAL_QUESTIONS,
    Embedder,
    indexed_courses,
    load_retrieval_questions,
    settings_for,
)
from rag.answering.answers import TOP_K
from rag.answering.prompts import build_prompt, cited_only
from rag.answering.rewrite import History, canonical_question, rule_rewrite
from rag.answering.search import RetrievedChunk, search_chunks
from rag.platform.resources import Resources
from rag.providers.offline import extractive_answer

MODES = ("dense", "rrf", "hybrid")


_TIMES: dict[str, list[float]] = defaultdict(list)


async def _retrieve(
    res: Resources, course_id: int, question: str, mode: str
) -> list[RetrievedChunk]:
    text = canonical_question(question)
    vector = (await res.embedding_cache().embed([text]))[0]
    started = time.perf_counter()
    try:
        return await _search(res, course_id, vector, text, mode)
    finally:
        _TIMES[mode.split("+")[0]].append((time.perf_counter() - started) * 1000)


async def _search(
    res: Resources, course_id: int, vector: Any, text: str, mode: str
) -> list[RetrievedChunk]:
    fusion = res.settings.fusion
    if fusion is not None and mode == "rrf":
        fusion = msgspec.structs.replace(fusion, method="rrf")
    return await search_chunks(
        res.db,
        course_id,
        vector,
        k=TOP_K,
        ef_search=res.settings.hnsw_ef_search,
        text=text,
        fusion=None if mode == "dense" else fusion,
    )


def _cited_topics(question: str, chunks: list[RetrievedChunk]) -> list[str]:
    prompt = build_prompt(course_title="", question=question, chunks=chunks)
    answer = extractive_answer(prompt.messages, 800)
    return [c.topic_key for c in cited_only(answer, prompt.citations)]


class _Tally:
    def __init__(self) -> None:
        self.n = 0
        self.counts: dict[str, int] = defaultdict(int)
        self.misses: list[dict[str, Any]] = []

    def add(self, expected: str, question: str, chunks: list[RetrievedChunk]) -> None:
        topics = [c.topic_key for c in chunks]
        cited = _cited_topics(question, chunks)
        self.n += 1
        hits = {
            "top1": topics[:1] == [expected],
            "recall@5": expected in topics[:5],
            "cited_first": cited[:1] == [expected],
            "cited_any": expected in cited,
        }
        for name, hit in hits.items():
            self.counts[name] += hit
        if not hits["top1"]:
            self.misses.append({"question": question, "expected": expected, "got": topics[:3]})

    def row(self) -> dict[str, Any]:
        figures = {name: round(self.counts[name] / self.n, 3) for name in _METRICS}
        return {"n": self.n, **figures}


_METRICS = ("top1", "recall@5", "cited_first", "cited_any")


async def measure(embedder: Embedder) -> dict[str, Any]:
    data = load_retrieval_questions()
    heldout = load_retrieval_questions(HELDOUT_RETRIEVAL_QUESTIONS)
    settings = settings_for(embedder)
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    async with indexed_courses(settings) as (res, ids):
        for label, questions in (("", data["questions"]), ("held-out ", heldout["questions"])):
            for item in questions:
                course = ids[item["course"]]
                for mode in MODES:
                    chunks = await _retrieve(res, course, item["question"], mode)
                    expected, question = item["topic"], item["question"]
                    tallies[f"{label}questions/{mode}"].add(expected, question, chunks)
                    if item.get("exact"):
                        tallies[f"{label}exact terms/{mode}"].add(expected, question, chunks)
        for item in data["followups"]:
            course = ids[item["course"]]
            history = History(questions=item["history"])
            rewritten = rule_rewrite(item["question"], history).text
            asked = {
                "dense": item["question"],
                "hybrid": item["question"],
                "hybrid+rewrite": rewritten,
                "hybrid+human": item["standalone"],
            }
            for mode, question in asked.items():
                chunks = await _retrieve(res, course, question, mode)
                tallies[f"follow-ups/{mode}"].add(item["topic"], question, chunks)
    rows = {name: tally.row() for name, tally in tallies.items()}
    return {
        "embedder": res.settings.embedding_model_id,
        "retrieval": {
            "top_k": TOP_K,
            "candidates": settings.retrieval_candidates,
            "fusion": settings.retrieval_fusion,
            "alpha": settings.retrieval_alpha,
            "rrf_k": settings.rrf_k,
            "dense_weight": settings.rrf_dense_weight,
            "lexical_weight": settings.rrf_lexical_weight,
        },
        "rows": rows,
        "query_ms": {
            mode: {"queries": len(t), "median": round(statistics.median(t), 2)}
            for mode, t in _TIMES.items()
        },
        "top1_misses": {name: tally.misses for name, tally in tallies.items()},
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\nembedder {result['embedder']}, retrieval {result['retrieval']}")
    print(f"{'set / mode':32} {'n':>4} " + " ".join(f"{m:>12}" for m in _METRICS))
    for name, row in result["rows"].items():
        print(f"{name:32} {row['n']:>4} " + " ".join(f"{row[m]:>12.3f}" for m in _METRICS))
    for mode, t in result["query_ms"].items():
        print(f"  {mode}: median {t['median']} ms per retrieval query ({t['queries']} queries)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embedder", choices=["offline", "local", "both"], default="offline")
    args = parser.parse_args()
    embedders: list[Embedder] = ["offline", "local"] if args.embedder == "both" else [args.embedder]
    for embedder in embedders:
        _TIMES.clear()
        result = asyncio.run(measure(embedder))
        print_table(result)
        write_result(f"retrieval_quality-{embedder}", result)


if __name__ == "__main__":
    main()
