"""Keeping a bot's token out of every log line: libraries log request URLs, and the Telegram Bot
API puts the token in each one (``https://api.telegram.org/bot<TOKEN>/getUpdates``)."""

from __future__ import annotations

import logging

__all__ = ["guard_token_in_logs"]

_guarded_tokens: set[str] = set()


def guard_token_in_logs(token: str) -> None:
    """Keep the token out of every log record: httpx and PTB both log URLs that hold it.

    A record factory, rather than a filter on some loggers, because any library logger
    (httpx, telegram.ext.ExtBot, ...) may print a URL, and filters do not inherit.
    """
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
    if token in _guarded_tokens:
        return
    _guarded_tokens.add(token)
    make_record = logging.getLogRecordFactory()

    def redacting_factory(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken log call is the logging module's to report
            return record
        if token in message:
            record.msg, record.args = message.replace(token, "***"), ()
        return record

    logging.setLogRecordFactory(redacting_factory)
