"""Logging for every long-running command (the agent, the controller): one rule, so no secret reaches
a log line at any level and no record can forge another line.

- Third-party loggers that print request headers, signed URLs or credentials' provenance at DEBUG
  (botocore: ``X-Amz-Security-Token`` and the access key id in its request dumps; urllib3 and
  httpx/httpcore: URLs with presigned queries; huggingface_hub: ``Authorization`` in its curl
  lines) stay at INFO or higher whatever ``--log-level`` says (:data:`QUIET`), and at WARNING
  unless ``--log-level DEBUG``: their per-request INFO lines are noise in a steady state.
- Each record's message is escaped (:func:`localmodel.text.printable`): a newline or an escape
  sequence in a remote name or a path cannot start a second line. A traceback, when a record
  carries one, still follows on its own lines.
- As a second guard, values of ``Authorization``, ``X-Amz-Security-Token``, ``X-Amz-Signature``,
  ``X-Amz-Credential``, ``Signature``, ``AWSAccessKeyId`` and any ``...token`` (header, query,
  JSON or repr form) are masked in any message; a path that ends in one of those names (a file
  ``.../token`` in an error) is not a key, and the words after it stay.
"""

from __future__ import annotations

import logging
import re
import sys

from localmodel.text import printable
from localmodel.uri import redact

# Loggers of the libraries the download and cluster clients use that log headers or URLs at DEBUG.
QUIET = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "httpx",
    "httpcore",
    "httpx2",
    "httpcore2",
    "huggingface_hub",
    "hf_xet",
    "aiohttp.client",
    "hpack",
    "h2",
    # The gs:// and Azure sources' SDKs: azure-core logs request URLs and headers at INFO and its
    # own complaints about a server's answers at WARNING; google-auth its credential lookups.
    "azure",
    "msal",
    "google",
)

# A name ending a path ("cannot read /run/peer/token: No such file") is not a key: no "/" or "\\"
# before it, or the word after its colon (an error's text) would be masked for a secret.
_SECRET = re.compile(
    r"(?i)(?<![/\\])(authorization|proxy-authorization|x-amz-security-token|x-amz-signature|x-amz-credential"
    r"|signature|awsaccesskeyid|token)(['\"]?\s*[:=]\s*['\"]?)(bearer\s+|basic\s+|aws4-hmac-sha256\s+)?"
    r"[^\s&'\",;]+"
)
_MESSAGE_LIMIT = 8000


def redact_secrets(text: str) -> str:
    """``text`` with the value of every secret-named header or query parameter replaced by ``***``."""
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}***", text)


# A URL inside free text: a scheme, "://", and what follows up to a space or a quote.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_message(text: str) -> str:
    """``text`` (a message that may quote an exception's text) fit for a log line, a status, an
    Event or the state file: every URL in it as :func:`localmodel.uri.redact` shows one (no
    userinfo, no query, no fragment), then :func:`redact_secrets`. Applied where those are written,
    since a library's error may quote a presigned URL or an endpoint from a Secret."""
    return redact_secrets(_URL_IN_TEXT.sub(lambda m: redact(m.group(0), limit=1000), text))


class OneLineFormatter(logging.Formatter):
    """A Formatter whose message part is one line, with secret-named values masked."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(redact_message(record.message), limit=_MESSAGE_LIMIT)
        return super().formatMessage(record)


def command_logging(prefix: str) -> None:
    """For a command that sets up no logging of its own (``pull``, ``status``): records at WARNING
    and above print as one line of the command's own (``PREFIX: message``, escaped and masked by
    :class:`OneLineFormatter`) rather than through logging's last resort, which prints a library's
    message bare. The libraries of :data:`QUIET` print only at ERROR: their warnings about a
    server's answers (azure-core's "Unexpected return type ... from ContentDecodePolicy") would be a
    second line beside the command's own error line, which says what failed. A later
    :func:`setup_logging` replaces all of this."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(f"{prefix}: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_logging(level: str | int, *, fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Log to stderr at ``level`` through :class:`OneLineFormatter`, with :data:`QUIET` held at INFO
    under DEBUG and at WARNING (or ``level`` when higher) otherwise. Replaces handlers set before
    (``force``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Their request lines (httpx logs every Lease renewal at INFO: 60 a minute) only at DEBUG, and
    # then without the headers they print at DEBUG themselves.
    level_no = logging.getLogger().getEffectiveLevel()
    floor = logging.INFO if level_no <= logging.DEBUG else max(logging.WARNING, level_no)
    for name in QUIET:
        logging.getLogger(name).setLevel(floor)
