"""CPU to pack a Redis command: redis-py's asyncio packer (Python) against the pools'
connections (hiredis, ``rag/platform/redis.py``), for the commands a question makes.

No server is involved: packing is the client's CPU before a command is sent, paid on
every command. Rounds alternate the two packers; the table gives each one's median.

Run: ``python -m bench.redis_packing``; JSON in ``bench/results/redis_packing.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection

from rag.platform.redis import hiredis_packing

RESULTS = Path(__file__).resolve().parent / "results" / "redis_packing.json"
STREAMS = [f"events:{n:08x}-0000-4000-8000-000000000000" for n in range(50)]
COMMANDS: dict[str, tuple[Any, ...]] = {
    # The API's event-stream reader with 50 answers streaming (rag/answering/events.py).
    "XREAD, 50 streams": ("XREAD", "COUNT", 100, "BLOCK", 5000, "STREAMS", *STREAMS, *["0-0"] * 50),
    # The rate limits' script call (api/limits.py), about that shape.
    "EVALSHA, 8 arguments": ("EVALSHA", "0" * 40, 2, b"l:u", b"l:c", 10, 60, 1765000000.5, 3),
    "XADD of a token batch": (
        "XADD",
        STREAMS[0],
        "MAXLEN",
        "~",
        5000,
        "*",
        "type",
        "token",
        "data",
        b'{"text":"' + b"w " * 40 + b'"}',
    ),
    "EXISTS": ("EXISTS", b"cancel:" + STREAMS[0].encode()),
}


def _cpu_us(connection: AbstractConnection, args: tuple[Any, ...], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        connection.pack_command(*args)
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5000, help="per command and round")
    args = parser.parse_args()
    packers = {
        "redis-py (Python)": Connection(),
        "hiredis (the pools')": hiredis_packing(Connection)(),
    }
    rows: dict[str, dict[str, float]] = {}
    for name, command in COMMANDS.items():
        runs: dict[str, list[float]] = {p: [] for p in packers}
        for _ in range(args.rounds):
            for packer, connection in packers.items():
                runs[packer].append(_cpu_us(connection, command, args.calls))
        rows[name] = {p: round(statistics.median(v), 2) for p, v in runs.items()}
    print(f"Packing a Redis command: µs of CPU, median of {args.rounds} alternating rounds")
    names = list(packers)
    print(f"  {'Command':24s}" + "".join(f"{n:>22s}" for n in names) + f"{'ratio':>8s}")
    for name, row in rows.items():
        ratio = row[names[0]] / row[names[1]]
        print(f"  {name:24s}" + "".join(f"{row[n]:>22.2f}" for n in names) + f"{ratio:>7.1f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"rounds": args.rounds, "calls": args.calls, "us": rows}, indent=2)
    )
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
