"""Profile a whole Python process with cProfile (``bench.service --profile DIR``).

``bench.service --profile DIR`` puts this folder on the ``PYTHONPATH`` of the
API and worker processes; Python imports ``sitecustomize`` at start-up, so each
process profiles itself from its first line and writes ``DIR/<name>-<pid>.prof``
when it exits (both stop cleanly on SIGTERM). Read the files with
``python -m pstats``. Nothing happens unless ``BENCH_PROFILE_DIR`` is set.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import signal
import sys
from pathlib import Path

_DIR = os.environ.get("BENCH_PROFILE_DIR")

if _DIR:
    _out = Path(_DIR)
    _profile = cProfile.Profile()

    def _dump() -> None:
        _profile.disable()
        main = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
        name = main.parent.name if main.name == "__main__.py" else main.stem
        words = [name, *(a for a in sys.argv[1:2] if a.isidentifier())]
        _profile.dump_stats(str(_out / f"{'-'.join(words)}-{os.getpid()}.prof"))

    def _exit(signum: int, frame: object) -> None:
        sys.exit(128 + signum)

    atexit.register(_dump)
    # uvicorn restores the previous SIGTERM handler and raises the signal again
    # once it has shut down: with the default handler, atexit would never run.
    signal.signal(signal.SIGTERM, _exit)
    _profile.enable()
