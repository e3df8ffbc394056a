"""Relevance floor: how similar the best chunk of the course is, for questions the
course covers and for questions it does not.

Run: ``python -m bench.relevance [--embedder offline|local]``.

``tests/data/relevance_questions.json`` lists 30 questions the demo course answers
and 30 it does not, written for this project. The course is chunked as a reindex
chunks it (the default chunk settings) and every chunk and question embedded as
the service embeds them; the top-1 cosine similarity of each question over all
chunks (exact, as HNSW approximates it) is what retrieval's best hit would score.
A floor between the two groups lets the service say "the course does not cover
this" with no sources instead of citing the least bad chunks. For floors 0.00 to
0.99 the table counts covered questions kept (must stay 100%) and uncovered ones
refused; the recommended floor is the highest that keeps every covered question,
minus a margin of 0.02. Prints a table; JSON in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import write_result
from rag.answering.rewrite import canonical_question
from rag.content.chunking import chunk_topic
from rag.content.courses import load_course
from rag.content.embeddings import normalize_text
from rag.platform.settings import Settings
from rag.providers.offline import hashed_embeddings

ROOT = Path(__file__).resolve().parent.parent
#: One file per course: the demo course's and the networking course's questions.
QUESTION_FILES = (
    ROOT / "tests" / "data" / "relevance_questions.json",
    ROOT / "tests" / "data" / "relevance_questions_networking.json",
)
MARGIN = 0.02
DEFAULT_DIMENSIONS = 1536

Embed = Callable[[list[str]], Any]
"""Texts to L2-normalized vectors, one row each."""


def offline_embed(dimensions: int) -> Embed:
    return lambda texts: hashed_embeddings(texts, dimensions)


def local_embed() -> Embed:
    """The local real model (``EMBEDDER=local``), as the service would run it."""
    from rag.providers.local import LocalEmbedder

    embedder = LocalEmbedder()
    return lambda texts: asyncio.run(embedder.embed(texts))


@dataclass(frozen=True)
class Measurement:
    covered: list[float]
    not_covered: list[float]
    recommended: float

    def row(self, floor: float) -> tuple[float, float]:
        """Share of covered questions kept and of uncovered ones refused at ``floor``."""
        kept = sum(s >= floor for s in self.covered) / len(self.covered)
        refused = sum(s < floor for s in self.not_covered) / len(self.not_covered)
        return kept, refused


def load_questions(path: Path) -> tuple[list[str], list[str], Path]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return list(data["covered"]), list(data["not_covered"]), ROOT / data["course"]


def top_similarities(questions: list[str], chunks: np.ndarray, embed: Embed) -> list[float]:
    # Embedded as the service embeds a question: its canonical form.
    vectors = np.asarray(
        embed([canonical_question(normalize_text(q)) for q in questions]), dtype=np.float64
    )
    return [float(s) for s in (vectors @ chunks.T).max(axis=1)]


def measure(embed: Embed, paths: tuple[Path, ...] = QUESTION_FILES) -> Measurement:
    """Each file's questions against its own course's chunks, pooled."""
    settings = Settings.from_env({})
    on: list[float] = []
    off: list[float] = []
    for path in paths:
        covered, not_covered, course_path = load_questions(path)
        texts = [
            chunk.embed_text
            for topic in load_course(course_path).topics
            for chunk in chunk_topic(
                topic.body,
                title=topic.title,
                target_tokens=settings.chunk_target_tokens,
                overlap_tokens=settings.chunk_overlap_tokens,
            )
        ]
        chunks = np.asarray(embed(texts), dtype=np.float64)
        on += top_similarities(covered, chunks, embed)
        off += top_similarities(not_covered, chunks, embed)
    recommended = max(0.0, round(min(on) - MARGIN, 2))
    return Measurement(on, off, recommended)


def report(result: Measurement, model: str) -> dict[str, Any]:
    floors = [round(f / 100, 2) for f in range(0, 100, 5)]
    kept, refused = result.row(result.recommended)
    return {
        "embedding_model": model,
        "covered": {
            "n": len(result.covered),
            "min": min(result.covered),
            "max": max(result.covered),
        },
        "not_covered": {
            "n": len(result.not_covered),
            "min": min(result.not_covered),
            "max": max(result.not_covered),
        },
        "recommended_floor": result.recommended,
        "at_recommended": {"covered_kept": kept, "not_covered_refused": refused},
        "floors": [
            {"floor": f, "covered_kept": result.row(f)[0], "not_covered_refused": result.row(f)[1]}
            for f in floors
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedder", choices=["offline", "local"], default="offline")
    args = parser.parse_args()
    if args.embedder == "local":
        model, embed = "local:all-MiniLM-L6-v2", local_embed()
    else:
        model, embed = "offline-hash-v1", offline_embed(DEFAULT_DIMENSIONS)
    result = measure(embed)
    data = report(result, model)
    print(f"\nRelevance floor, {model}: top-1 similarity over each question's course's chunks")
    for group in ("covered", "not_covered"):
        g = data[group]
        print(f"  {group:<12} n={g['n']}  min {g['min']:.3f}  max {g['max']:.3f}")
    print(f"\n  {'floor':>5}  {'covered kept':>12}  {'uncovered refused':>17}")
    for row in data["floors"]:
        kept, refused = row["covered_kept"], row["not_covered_refused"]
        print(f"  {row['floor']:>5.2f}  {kept:>12.2f}  {refused:>17.2f}")
    at = data["at_recommended"]
    print(
        f"\n  recommended floor {result.recommended:.2f} (lowest covered - {MARGIN}): covered "
        f"kept {at['covered_kept']:.2f}, uncovered refused {at['not_covered_refused']:.2f}"
    )
    write_result("relevance" + ("-local" if args.embedder == "local" else ""), data)


if __name__ == "__main__":
    main()
