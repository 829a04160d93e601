"""Timestamps as Kubernetes writes them: RFC 3339 in UTC to the second (``2026-11-24T12:00:00Z``, the
``metav1.Time`` form), for status fields, Events, manifests and state files alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now(*, after_s: float = 0.0) -> str:
    """Now (or ``after_s`` seconds from now), e.g. ``"2026-11-24T12:00:00Z"``; fractions truncated."""
    return (datetime.now(UTC) + timedelta(seconds=after_s)).strftime(_FORMAT)
