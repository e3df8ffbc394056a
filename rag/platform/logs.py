"""One log format for every process: ours, uvicorn's and arq's.

``LOG_FORMAT=json`` writes one JSON object per line (``ts``, ``level``, ``logger``,
``message``, and ``request_id``/``job_id`` when the line belongs to a request or a
question, ``exc`` with the traceback); ``text`` is the terminal's
``time level logger: message [request_id=… job_id=…]``; ``auto`` (the default) is
text on a terminal and JSON otherwise.

The ids ride in context variables: the API sets ``request_id`` per request (from
``X-Request-ID`` or a new one, ``api/app.py``) and hands it to the worker with the
job; the worker sets both while it runs a job. arq's own lines about a job name it
as ``<job id>:<function>``, which :class:`ContextFilter` reads the job id from.

The formatter is ours rather than python-json-logger's: msgspec (already the
project's serializer) encodes the record in a few lines, and the fields and their
names are exactly the ones documented here.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

#: What a client may send as X-Request-ID (anything else is replaced by a new id).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ARQ_REF = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}):\w+")
#: Loggers that install handlers of their own; theirs go and they propagate to ours.
_FOREIGN = ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "arq.worker", "arq.jobs")
#: LogRecord attributes that are not "extra" fields (uvicorn's ``color_message`` is
#: its message again, with terminal colour codes).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "job_id",
    "taskName",
    "color_message",
}


@contextlib.contextmanager
def logged_job(job_id: str, request_id: str | None = None) -> Iterator[None]:
    """Every line logged inside carries ``job_id`` (and the asking request's id)."""
    job = JOB_ID.set(job_id)
    request = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(request)
        JOB_ID.reset(job)


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``job_id`` to every record (None when unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        if getattr(record, "job_id", None) is None:
            job = JOB_ID.get()
            if job is None and record.name.startswith("arq") and isinstance(record.args, tuple):
                job = next(
                    (m[1] for a in record.args if isinstance(a, str) and (m := _ARQ_REF.match(a))),
                    None,
                )
            record.job_id = job
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields of the record are kept."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            if (value := getattr(record, key, None)) is not None:
                entry[key] = value
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry, enc_hook=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{key}={value}"
            for key in ("request_id", "job_id")
            if (value := getattr(record, key, None)) is not None
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Route every logger through one handler on the root logger, in ``fmt``
    (``json``, ``text`` or ``auto``); call once, first thing in a process."""
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if out.isatty() else "json"
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _FOREIGN:
        foreign = logging.getLogger(name)
        foreign.handlers.clear()
        foreign.propagate = True
