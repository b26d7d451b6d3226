"""Launcher logging (text or JSON lines) and re-emission of the shards' loguru JSON lines."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LOGURU_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "SUCCESS": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
TRACING_LEVELS = {
    "trace": "TRACE",
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARN",
    "error": "ERROR",
    "off": "OFF",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "message": record.getMessage(),
            "target": record.name,
        }
        if getattr(record, "rank", None) is not None:
            entry["rank"] = record.rank
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def shard_log_level() -> str:
    """The level passed to shards as ``--logger-level``: LOG_LEVEL's global directive, upper-cased
    (tracing names: TRACE, DEBUG, INFO, WARN, ERROR, OFF); INFO by default."""
    for directive in os.environ.get("LOG_LEVEL", "info").split(","):
        if "=" not in directive and directive.strip().lower() in TRACING_LEVELS:
            return TRACING_LEVELS[directive.strip().lower()]
    return "INFO"


def setup_logging(json_output: bool) -> None:
    level = shard_log_level()
    py_level = {"TRACE": logging.DEBUG, "WARN": logging.WARNING, "OFF": logging.CRITICAL + 10}.get(
        level, getattr(logging, level, logging.INFO)
    )
    handler = logging.StreamHandler(sys.stdout)
    if json_output:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(py_level)
    for noisy in ("aiohttp.access",):
        logging.getLogger(noisy).setLevel(max(py_level, logging.WARNING))
    quiet_library_handlers()


def quiet_library_handlers() -> None:
    """huggingface_hub adds its own stderr handler *and* propagates to the root logger, so each of
    its warnings was printed twice; drop its handler so they pass through ours once."""
    import huggingface_hub.utils.logging  # noqa: F401 - configures the library's logger

    logging.getLogger("huggingface_hub").handlers.clear()


def emit_shard_line(line: str, rank: int, logger: logging.Logger) -> None:
    """Re-emit one shard stdout line: loguru ``serialize`` JSON at its level; anything else only
    at DEBUG (as the Rust launcher does)."""
    line = line.rstrip("\n")
    if not line:
        return
    try:
        message = json.loads(line)
        text = str(message["text"]).rstrip("\n")
        level = LOGURU_LEVELS.get(message["record"]["level"]["name"], logging.INFO)
    except (ValueError, KeyError, TypeError):
        logger.debug(line, extra={"rank": rank})
        return
    logger.log(level, text, extra={"rank": rank})
