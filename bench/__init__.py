"""Benchmarks: each prints a table and writes its figures to ``bench/results/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, result: Any) -> Path:
    """``result`` as ``bench/results/NAME.json`` (values JSON lacks, as text); says where."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2, default=str, ensure_ascii=False) + "\n")
    print(f"\nwritten to {out.relative_to(RESULTS.parent.parent)}")
    return out
