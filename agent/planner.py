"""The agent's pure planner: given what the node must hold, what its disk holds and what is in
flight, decide what to keep, download, delete and refuse. No I/O: frozen inputs, a frozen plan.

Capacity rules:
- A model's need is its real size once the source listing is known, else its declared ``modelSize``.
- Space held by published models and by in-flight downloads counts against both the group's
  ``storageLimit`` and the filesystem's real free space (a download in flight still has
  ``need - bytes already staged`` to write).
- A model that does not fit is refused with how much it needs and how much is available; a model
  still desired is never evicted to make room.
- A model whose real size exceeds its declared size is refused, unless it still fits, in which case
  it proceeds with a warning (the declared size is what the controller admitted).
- Overcommit (``--admission warn``): the group's limit refuses nothing; a model over it proceeds
  with a warning while the filesystem has room.
- A model no longer wanted is deleted, published or staged, unless it is ``held``: in its grace
  period after leaving the spec (another writer may put it straight back; deleting and fetching it
  again each time is what KServe's own controller left running caused). A held model keeps its
  bytes, which count as used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from localmodel.placement import human
from localmodel.quantity import readable


@dataclass(frozen=True)
class Want:
    """A model the node must hold."""

    name: str
    key: str
    declared: int | None  # modelSize, bytes
    real: int | None = None  # from the source listing, once known

    @property
    def need(self) -> int:
        return self.real if self.real is not None else (self.declared or 0)


@dataclass(frozen=True)
class Disk:
    published: Mapping[str, int]  # storage key -> bytes on disk (complete, trusted)
    staged: Mapping[str, int] = field(default_factory=dict)  # storage key -> bytes already staged
    free: int = 0  # free bytes on the cache's filesystem, now


@dataclass(frozen=True)
class Refused:
    name: str
    reason: str  # InsufficientStorage | SizeExceedsDeclared
    message: str


@dataclass(frozen=True)
class Plan:
    keep: tuple[str, ...]  # names of wanted models already published
    download: tuple[str, ...]  # names to fetch (or keep fetching)
    delete: tuple[str, ...]  # storage keys to remove (published or staged), none of them wanted
    refuse: tuple[Refused, ...]
    warnings: Mapping[str, str]  # name -> message (proceeding, but something to know)
    limit: int | None
    used: int  # published kept + reserved for downloads, after the plan

    @property
    def available(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


def _refused(w: Want, to_write: int, limit: int | None, *, used: int, free: int) -> Refused:
    """The refusal of a model that does not fit: under the node group's ``limit`` (None: the limit
    did not refuse it, the filesystem's ``free`` bytes did) with ``used`` bytes taken; bytes
    throughout. SizeExceedsDeclared when the source holds more than its declared modelSize, else
    InsufficientStorage (needing ``to_write`` bytes on the filesystem, or the whole need under the limit)."""
    need = w.need
    if limit is not None:
        room = f"{human(max(0, limit - used))} of the node group's {human(limit)} limit"
    else:
        # Free space is rarely a round number: exact Ki would be unreadable.
        amount = human(free) if free % (1 << 20) == 0 else readable(free)
        room = f"{amount} free on the cache's filesystem"
    bigger = w.real is not None and w.declared is not None and w.real > w.declared
    return Refused(
        w.name,
        "SizeExceedsDeclared" if bigger else "InsufficientStorage",
        (
            f"the source holds {human(need)}, more than the declared modelSize "
            f"{human(w.declared or 0)}, and only {room} is available"
        )
        if bigger
        else f"needs {human(to_write if limit is None else need)}, {room} is available",
    )


def plan(
    wants: tuple[Want, ...],
    disk: Disk,
    *,
    limit: int | None,
    in_flight: frozenset[str] = frozenset(),
    held: frozenset[str] = frozenset(),
    overcommit: bool = False,
) -> Plan:
    """``in_flight``: storage keys being downloaded right now (they keep their reservation first);
    ``held``: storage keys not wanted any more but still in their grace period (not deleted).
    ``overcommit`` (``--admission warn``): a model over the node group's ``limit`` but with room on
    the filesystem is downloaded, with a warning naming the need and the room (the controller
    placed it over the limit on purpose); no room on the filesystem still refuses it."""
    wanted_keys = {w.key for w in wants}
    unwanted = (set(disk.published) | set(disk.staged)) - wanted_keys - in_flight
    delete = tuple(sorted(unwanted - held))
    freed = sum(disk.published.get(k, 0) + disk.staged.get(k, 0) for k in delete)
    keep = [w for w in wants if w.key in disk.published]
    used = sum(disk.published[w.key] for w in keep) + sum(disk.published.get(k, 0) for k in unwanted & held)
    free = disk.free + freed
    # Downloads in flight first (they already hold space), then the rest by name: stable.
    order = sorted(
        (w for w in wants if w.key not in disk.published), key=lambda w: (w.key not in in_flight, w.name)
    )
    download: list[str] = []
    refuse: list[Refused] = []
    warnings: dict[str, str] = {}
    for w in order:
        need = w.need
        to_write = max(0, need - disk.staged.get(w.key, 0))
        over_limit = limit is not None and used + need > limit
        if over_limit and overcommit and to_write <= free and limit is not None:
            warnings[w.name] = (
                f"over the node group's limit (--admission warn): needs {human(need)}, "
                f"{human(max(0, limit - used))} of the node group's {human(limit)} limit is available; "
                "downloaded, as the filesystem has room"
            )
            download.append(w.name)
            used += need
            free -= to_write
            continue
        limited = over_limit and not overcommit  # the limit refuses it (else only the disk can)
        if limited or to_write > free:
            refuse.append(_refused(w, to_write, limit if limited else None, used=used, free=free))
            continue
        if w.real is not None and w.declared is not None and w.real > w.declared:
            warnings[w.name] = (
                f"the source holds {human(w.real)}, more than the declared modelSize "
                f"{human(w.declared)}; it still fits, so it is downloaded"
            )
        download.append(w.name)
        used += need
        free -= to_write
    return Plan(
        keep=tuple(sorted(w.name for w in keep)),
        download=tuple(download),
        delete=delete,
        refuse=tuple(refuse),
        warnings=warnings,
        limit=limit,
        used=used,
    )
