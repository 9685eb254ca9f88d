"""Keep credential values out of logs, MLflow params/tags and files the pipeline writes.

Credentials reach a run only through the environment (AWS keys, MLflow tracking auth). The
values of those variables are replaced by `***` wherever text leaves the process through
`redact` or a logging handler with `RedactingFilter`; URLs lose their `user:password@` part.
"""

import logging
import os
import re
import sys
import traceback

from vsgd.lineage import URL_USERINFO

MASK = "***"
# Standard variables that carry a credential value (the AWS SDK's and MLflow's client auth).
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# Any other variable whose name says it holds a secret.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE_KEY|API_KEY", re.I)
# Shorter values are too likely to occur by chance (and to mangle ordinary text).
MIN_LEN = 6


def secret_values(environ=None) -> list[str]:
    """Credential values of the environment, longest first (so overlaps mask fully)."""
    environ = os.environ if environ is None else environ
    values = {
        v
        for k, v in environ.items()
        if v and len(v) >= MIN_LEN and (k in SECRET_ENV or SECRET_NAME.search(k))
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ=None) -> str:
    """`text` with every credential value of the environment and URL userinfo masked."""
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return URL_USERINFO.sub(f"{MASK}@", text)


class RedactingFilter(logging.Filter):
    """Formats the record's message once, masked; attach it to handlers (a handler filter
    sees records of every logger that propagates to it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback text is rendered later by the formatter: render it now, masked.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Mask credentials in everything `logger`'s handlers write; for the root logger (the
    default) also in the traceback of an uncaught exception, the last thing a run logs."""
    if logger is None or logger is logging.getLogger():
        logger = logging.getLogger()
        if not getattr(sys.excepthook, "redacting", False):
            sys.excepthook = _redacting_excepthook
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _redacting_excepthook(exc_type, exc, tb):
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


_redacting_excepthook.redacting = True
