"""The one timestamp form of status fields, Events, manifests and state files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from localmodel.timestamps import utc_now


def _parse(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def test_now_is_rfc3339_utc_to_the_second_as_kubernetes_writes_it() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = utc_now()
    after = datetime.now(UTC)
    assert len(stamp) == 20 and stamp.endswith("Z")
    assert before <= _parse(stamp) <= after


def test_a_later_time_is_offset_by_the_seconds_given() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    later = _parse(utc_now(after_s=3600))
    assert before + timedelta(hours=1) <= later <= datetime.now(UTC) + timedelta(hours=1)
