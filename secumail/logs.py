"""Logging: one line per event, `key=value` text or JSON, to stderr (what containers collect)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "secumail_fields"


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\\\n'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, _FIELDS, {})
        pairs = "".join(f" {k}={_quote(v)}" for k, v in fields.items())
        line = f"{stamp}Z {record.levelname} {record.name}: {record.getMessage()}{pairs}"
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


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_event(
    logger: logging.Logger, message: str, level: int = logging.INFO, **fields: object
) -> None:
    """Log `message` with structured fields: `log_event(log, "decision", action="REJECT")`."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={_FIELDS: fields})
