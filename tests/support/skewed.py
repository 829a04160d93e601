"""Run ``modelcache ARGS`` with the leader election's wall clock ``SKEW`` seconds ahead (a node
whose clock is off): ``python tests/support/skewed.py controller ...`` with $SKEW set."""

from __future__ import annotations

import os
import runpy
import sys
from datetime import datetime, timedelta, tzinfo

import controller.leader as leader

SKEW = timedelta(seconds=float(os.environ.get("SKEW", "0")))


class _Skewed(datetime):
    @classmethod
    def now(cls, tz: tzinfo | None = None) -> _Skewed:
        t = datetime.now(tz) + SKEW
        return cls.fromtimestamp(t.timestamp(), t.tzinfo)


leader.datetime = _Skewed  # type: ignore[attr-defined]  # only the leader module's clock is off
sys.argv = ["modelcache", *sys.argv[1:]]
runpy.run_module("modelcache", run_name="__main__")
