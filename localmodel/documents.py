"""Read the YAML documents a user would ``kubectl apply`` (a file, or a folder of files).

All or nothing: :func:`load_documents` validates every document before returning any, so a bad one
is refused with one line naming the file, the document's index, the field and what is wrong, and
the caller keeps the state it had. ``kind: List`` (``kubectl get -o yaml`` output) is flattened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from localmodel.errors import InvalidInput, SpecError
from localmodel.folders import unreachable
from localmodel.k8snames import path_segment_error
from localmodel.kinds import (
    JSON,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    SECRET,
    SERVICE_ACCOUNT,
    ResourceKind,
)
from localmodel.resources import (
    LocalModelCache,
    LocalModelNamespaceCache,
    LocalModelNode,
    LocalModelNodeGroup,
    Node,
)
from localmodel.timestamps import normalised

# kind -> (where it lives, how to validate and normalise it)
_PARSERS: dict[str, tuple[ResourceKind, Callable[[Any], JSON]]] = {
    "LocalModelCache": (LOCAL_MODEL_CACHE, lambda d: LocalModelCache.from_json(d).to_json()),
    "LocalModelNamespaceCache": (
        LOCAL_MODEL_NAMESPACE_CACHE,
        lambda d: LocalModelNamespaceCache.from_json(d).to_json(),
    ),
    "LocalModelNodeGroup": (
        LOCAL_MODEL_NODE_GROUP,
        lambda d: LocalModelNodeGroup.from_json(d).to_json(),
    ),
    "LocalModelNode": (LOCAL_MODEL_NODE, lambda d: LocalModelNode.from_json(d).to_json()),
    "Node": (NODE, lambda d: _node(d)),
    # Standalone agent: a cache's own credentials (agent.credentials), as kubectl would apply them.
    "Secret": (SECRET, lambda d: _credentials_object(d, ("data", "stringData"))),
    "ServiceAccount": (SERVICE_ACCOUNT, lambda d: _credentials_object(d, ())),
}
SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Document:
    where: str  # "file.yaml#2": the file and the document's number in it (from 1), for messages
    kind: ResourceKind
    object: JSON

    @property
    def name(self) -> str:
        """Its name, ``<namespace>/<name>`` for a namespaced kind (what tells two apart)."""
        meta = self.object["metadata"]
        if self.kind.namespaced:
            return f"{meta.get('namespace') or 'default'}/{meta['name']}"
        return str(meta["name"])


def load_documents(
    path: Path, *, kinds: Iterable[str] | None = None, exclude: Iterable[Path] = ()
) -> list[Document]:
    """Every document under ``path`` (see :func:`document_files`), validated; raises SpecError (one
    line) on the first bad one."""
    allowed = set(kinds) if kinds is not None else set(_PARSERS)
    try:
        files = document_files(path, exclude=exclude)
    except OSError as e:  # the file, or a folder above it, this user may not look at
        raise SpecError(unreachable(path, e), where=str(path)) from None
    docs: list[Document] = []
    seen: dict[tuple[str, str], str] = {}
    for file in files:
        for doc in _parse_file(file, allowed):
            key = (doc.kind.kind, doc.name)
            if key in seen:
                raise SpecError(
                    f"{doc.kind.kind} {doc.name!r} is defined twice (first in {seen[key]})",
                    where=doc.where,
                )
            seen[key] = doc.where
            docs.append(doc)
    return docs


def parse_text(text: str, *, where: str, kinds: Iterable[str] | None = None) -> list[Document]:
    """Documents from a string (for tests and stdin)."""
    return list(_parse_stream(text, where, set(kinds) if kinds is not None else set(_PARSERS)))


def document_files(path: Path, *, exclude: Iterable[Path] = ()) -> list[Path]:
    """``path`` itself, or the YAML/JSON files below it, in order: hidden files and folders skipped,
    and everything under ``exclude`` (a cache folder kept inside the documents' folder holds the
    models' own JSON files, which are no documents)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        skip = [e.absolute() for e in exclude]
        return sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and not any(p.absolute().is_relative_to(e) for e in skip)
        )
    raise SpecError(f"no such file or folder: {path}", where=str(path))


def _parse_file(file: Path, allowed: set[str]) -> list[Document]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read: {e}", where=str(file)) from e
    return list(_parse_stream(text, str(file), allowed))


def _parse_stream(text: str, where: str, allowed: set[str]) -> Iterable[Document]:
    try:
        raw_docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"not valid YAML: {problem}{line}", where=where) from e
    except (ValueError, RecursionError) as e:  # e.g. a timestamp out of range, deep nesting
        raise SpecError(f"not valid YAML: {e}", where=where) from e
    for index, raw in enumerate(raw_docs):
        if raw is None:
            continue
        doc_where = f"{where}#{index + 1}"  # as people count: the first document is #1
        items = raw.get("items") if isinstance(raw, dict) and _is_list(raw) else [raw]
        if not isinstance(items, list):
            raise SpecError("expected items to be a list", field="items", where=doc_where)
        for j, item in enumerate(items):
            yield _document(item, doc_where if len(items) == 1 else f"{doc_where}[{j}]", allowed)


def _is_list(raw: dict[str, Any]) -> bool:
    kind = raw.get("kind")
    return isinstance(kind, str) and kind.endswith("List") and "items" in raw


def _document(raw: Any, where: str, allowed: set[str]) -> Document:
    if not isinstance(raw, dict):
        raise SpecError(f"expected a Kubernetes object, got {type(raw).__name__}", where=where)
    kind = raw.get("kind")
    if not isinstance(kind, str) or not kind:
        raise SpecError("is required", field="kind", where=where)
    if kind not in allowed:
        raise SpecError(
            f"unknown kind {kind!r}; expected one of {', '.join(sorted(allowed))}",
            field="kind",
            where=where,
        )
    resource, parse = _PARSERS[kind]
    if raw.get("apiVersion") != resource.api_version:
        raise SpecError(
            f"expected {resource.api_version!r} for {kind}, got {raw.get('apiVersion')!r}",
            field="apiVersion",
            where=where,
        )
    meta = raw.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    for what in ("name", "namespace"):
        value = meta.get(what)
        if isinstance(value, str) and (why := path_segment_error(value)) is not None:
            raise SpecError(why, field=f"metadata.{what}", where=where)
    try:
        normalised = parse(_created_kept(raw))
    except SpecError as e:
        raise e.located(where) from None
    except InvalidInput as e:
        raise SpecError(str(e), where=where) from None
    return Document(where, resource, normalised)


def _created_kept(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its ``metadata.creationTimestamp``, when given, in the API server's form: the
    embedded state keeps it (admission goes oldest first), and YAML makes a ``datetime`` of an
    unquoted one."""
    meta = raw.get("metadata")
    if not isinstance(meta, dict) or meta.get("creationTimestamp") is None:
        return raw
    try:
        created = normalised(meta["creationTimestamp"])
    except ValueError:
        raise SpecError(
            "expected an RFC 3339 time such as 2025-01-31T12:00:00Z (or leave it out: now)",
            field="metadata.creationTimestamp",
        ) from None
    return {**raw, "metadata": {**meta, "creationTimestamp": created}}


def _node(raw: Any) -> JSON:
    node = Node.from_json(raw)
    out: JSON = dict(raw)
    out["metadata"] = dict(raw.get("metadata") or {}, name=node.name)
    return out


def _credentials_object(raw: Any, maps: tuple[str, ...]) -> JSON:
    """A Secret or ServiceAccount as the API server would store it: a name, and each of ``maps``
    a mapping of string keys to string values. Errors name the field, never a value."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else None
    if meta is None or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise SpecError("is required", field="metadata.name")
    for name in maps:
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise SpecError("expected a mapping of names to values", field=name)
        for k, v in value.items():
            if not isinstance(v, str):
                raise SpecError("expected a string (quote it)", field=f"{name}.{k}")
    return dict(raw)
