"""Writes that cannot stick, pure: what a writer learns when the API server keeps less than it wrote.

An API server prunes every field a custom resource's structural schema does not name
(kubernetes/apiextensions-apiserver pkg/apiserver/schema/pruning/algorithm.go): under KServe's own
CRDs our additions (a LocalModelNode entry's ``modelSize``, a cache's ``conditions`` and
``observedGeneration``, the agent's ``models``) are dropped on every write. A writer that compares
what it wants with what is stored then finds a difference on every pass and writes forever.

:class:`Sticking` learns from each write's answer instead of reading the installed CRDs (which needs
no permission on CustomResourceDefinitions and follows a CRD changed at run time):

- :func:`dropped` gives the paths of fields a write sent that the stored object lacks; they are
  remembered per kind (list items as ``*``, so one entry's pruned field stands for all entries);
- what an object was meant to be (the stored section merged with the patch sent) is remembered per
  object while the server keeps exactly the rest of it (:func:`strip` of the intended section equals
  the stored one): :meth:`Sticking.take` then hands the writer the intended section instead of the
  stored one, so a converged object plans no write (and no Event derived from its status);
- :meth:`Sticking.futile`: a planned write whose change lies only in fields that do not stick is
  not sent at all.

A section is one top-level part of the object that one writer owns (``spec`` or ``status``). A kind
whose writes have dropped nothing costs a comparison per write and no memory.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from localmodel.kinds import JSON

Path = tuple[str, ...]  # keys from the section's root; ANY for every item of a list
ANY = "*"


def dropped(intended: Any, stored: Any, at: Path = ()) -> frozenset[Path]:
    """The paths of keys ``intended`` has (with a value other than None) that ``stored`` lacks;
    lists of equal length are compared item by item (as ``ANY``), other values not at all."""
    out: set[Path] = set()
    _dropped(intended, stored, at, out)
    return frozenset(out)


def _dropped(intended: Any, stored: Any, at: Path, out: set[Path]) -> None:
    # One set filled in place, and concrete-type checks (an ABC isinstance costs several times
    # more): every write's answer is walked, a status of thousands of node entries included.
    if isinstance(intended, dict) and isinstance(stored, dict):
        for key, value in intended.items():
            if value is None:
                continue
            if key not in stored:
                out.add((*at, str(key)))
            elif type(value) is dict or type(value) is list:
                _dropped(value, stored[key], (*at, str(key)), out)
    elif isinstance(intended, list) and isinstance(stored, list) and len(intended) == len(stored):
        if intended and not isinstance(intended[0], (dict, list)):
            return  # scalars hold no keys to drop
        for a, b in zip(intended, stored, strict=True):
            _dropped(a, b, (*at, ANY), out)


def strip(value: Any, paths: frozenset[Path]) -> Any:
    """``value`` without the fields at ``paths`` (a copy where anything is removed; shared where
    nothing is)."""
    if not paths:
        return value
    return _strip(value, _trie(paths))


def _trie(paths: frozenset[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in paths:
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if node is _LEAF:
                break
        else:
            node[path[-1]] = _LEAF
    return root


_LEAF: dict[str, Any] = {}  # a key removed whole


def _strip(value: Any, trie: Mapping[str, Any]) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            below = trie.get(key)
            if below is _LEAF:
                continue
            out[key] = item if below is None else _strip(item, below)
        return out
    if isinstance(value, list) and ANY in trie:
        below = trie[ANY]
        return [] if below is _LEAF else [_strip(item, below) for item in value]
    return value


def merged(stored: Any, patch: Any) -> Any:
    """RFC 7386: ``patch`` merged into ``stored`` (maps merge, None deletes, the rest replaces), as
    the API server merges a merge patch before it prunes."""
    if not isinstance(patch, Mapping):
        return patch
    out = dict(stored) if isinstance(stored, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merged(out.get(key), value)
    return out


class Sticking:
    """What did not stick, per kind (paths) and per object (the section it was meant to be).

    Keys of objects are whatever the caller uses (``(namespace, name)`` or a name); kinds are names.
    No I/O: the writer calls :meth:`learn` with each write's answer, :meth:`take` with each object
    it reads, and :meth:`futile` before each write."""

    def __init__(self) -> None:
        self._paths: dict[str, frozenset[Path]] = {}
        self._stored: dict[tuple[str, Hashable], Any] = {}  # the section last read, where paths exist
        self._intended: dict[tuple[str, Hashable], Any] = {}  # what it was meant to be

    def paths(self, kind: str) -> frozenset[Path]:
        """The fields of ``kind``'s section that writes did not keep (empty: none so far)."""
        return self._paths.get(kind, frozenset())

    def learn(self, kind: str, key: Hashable, patch: Mapping[str, Any], stored: Any) -> frozenset[Path]:
        """After a write of merge ``patch`` into the section, answered with the ``stored`` section:
        the paths newly found not to stick (empty when everything stuck)."""
        # What the patch sent is all that can have been dropped: no merged copy while nothing is
        # (a status of thousands of node entries is written in full passes).
        new = dropped(patch, stored) - self.paths(kind)
        if new:
            self._paths[kind] = self.paths(kind) | new
        if self.paths(kind):
            intended = merged(stored, patch)
            self._stored[(kind, key)] = stored
            if intended != stored:
                self._intended[(kind, key)] = intended
            else:
                self._intended.pop((kind, key), None)
        return new

    def take(self, kind: str, key: Hashable, stored: Any) -> Any:
        """The section a reader should see for this stored one: what the writer meant, while the
        server keeps all of it that can stick; else the stored section (the meaning is forgotten:
        someone else changed it, or it changed since)."""
        paths = self._paths.get(kind)
        if not paths:
            return stored
        self._stored[(kind, key)] = stored
        intended = self._intended.get((kind, key))
        if intended is None:
            return stored
        if strip(intended, paths) == stored:
            return intended
        del self._intended[(kind, key)]
        return stored

    def futile(self, kind: str, key: Hashable, patch: Mapping[str, Any]) -> bool:
        """Whether merging ``patch`` into the section last read would change only fields that do not
        stick (then it is remembered as meant, and not sent). False when nothing is known."""
        paths = self._paths.get(kind)
        if not paths or (kind, key) not in self._stored:
            return False
        stored = self._stored[(kind, key)]
        intended = merged(stored, patch)
        if strip(intended, paths) != stored:
            return False
        if intended != stored:
            self._intended[(kind, key)] = intended
        return True

    def forget(self, kind: str, key: Hashable) -> None:
        """The object is gone."""
        self._stored.pop((kind, key), None)
        self._intended.pop((kind, key), None)


def section_of(obj: JSON, section: str) -> Any:
    """The object's ``spec`` or ``status`` ({} when it has none)."""
    value = obj.get(section)
    return value if value is not None else {}
