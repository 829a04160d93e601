"""Timestamps as Kubernetes writes them: RFC 3339 in UTC to the second (``2026-11-24T12:00:00Z``, the
``metav1.Time`` form), for status fields, Events, manifests and state files alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now(*, after_s: float = 0.0) -> str:
    """Now (or ``after_s`` seconds from now), e.g. ``"2026-11-24T12:00:00Z"``; fractions truncated."""
    return (datetime.now(UTC) + timedelta(seconds=after_s)).strftime(_FORMAT)


def normalised(value: object) -> str:
    """``value`` (RFC 3339 text with any offset and fraction, or the ``datetime`` a YAML loader makes
    of an unquoted one; a naive one is taken as UTC) in the form :func:`utc_now` writes. ValueError
    when it is neither."""
    if isinstance(value, str):
        when = datetime.fromisoformat(value)
        if "T" not in value.upper():
            raise ValueError(f"expected a date and time, got {value!r}")
    elif isinstance(value, datetime):
        when = value
    else:
        raise ValueError(f"expected an RFC 3339 time, got {type(value).__name__}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime(_FORMAT)
