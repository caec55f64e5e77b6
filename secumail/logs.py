"""Logging: one line per event, `key=value` text or JSON, to stderr (what containers collect)."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
import time
from typing import Any

_FIELDS = "secumail_fields"


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _quote(value: object) -> str:
    return _quote_text(value if type(value) is str else str(value))


# Most values repeat from line to line (actions, checks, reasons, stages, recipients): a
# cache hit costs a third of the regex search and the quoting.
@functools.lru_cache(maxsize=1024)
def _quote_text(text: str) -> str:
    if text == "" or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


@functools.lru_cache(maxsize=4)
def _timestamp(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = _timestamp(int(record.created))
        fields = getattr(record, _FIELDS, {})
        pairs = "".join([f" {k}={_quote(v)}" for k, v in fields.items()])
        line = f"{stamp} {record.levelname} {record.name}: {record.getMessage()}{pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class BufferedStderrHandler(logging.Handler):
    """Writes log lines in batches: a write(2) per line costs more than deciding a request.

    Lines are flushed when `capacity` pile up, on every WARNING or worse, at exit, and by a
    background thread every `interval` seconds, so a quiet service still logs promptly.
    """

    def __init__(self, capacity: int = 256, interval: float = 0.2) -> None:
        super().__init__()
        self.capacity = capacity
        self.lines: list[str] = []
        self._flusher = threading.Thread(
            target=self._flush_every, args=(interval,), daemon=True, name="log-flush"
        )
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.handleError(record)
        if len(self.lines) >= self.capacity or record.levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self.lines = self.lines, []
        if lines:
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()

    def _flush_every(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.flush()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    # The logging HOWTO's "Optimization" section: skip what the lines never show
    # (caller's file and line, thread and process names); it halves the cost of a line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BufferedStderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every SMTP command line at INFO ("mail.log"): the relay's own line per
    # message says what matters, without an address per command.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))


def describe(error: BaseException) -> str:
    """An error for a log line or a reply: its text, or its kind when it has none
    (TimeoutError, ConnectionResetError() and the like print as nothing)."""
    return str(error) or type(error).__name__


def log_event(
    logger: logging.Logger, message: str, level: int = logging.INFO, **fields: object
) -> None:
    """Log `message` with structured fields: `log_event(log, "decision", action="REJECT")`."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={_FIELDS: fields})
