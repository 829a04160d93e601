"""The docs point only at what exists: every relative link in README.md, CONTRIBUTING.md and docs/
names a file or folder of the repository, and every ``#anchor`` a heading of the file it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` dropped, spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.MULTILINE)}


def links(doc: Path) -> list[tuple[Path, str]]:
    found = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address: not ours to check offline
        file, _, anchor = target.partition("#")
        found.append(((doc.parent / file).resolve() if file else doc, anchor))
    return found


def test_slug_is_githubs() -> None:
    assert slug("Known limits") == "known-limits"
    assert slug("`modelcache pull`") == "modelcache-pull"
    assert slug("Install on a cluster") == "install-on-a-cluster"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_exists(doc: Path) -> None:
    for target, anchor in links(doc):
        assert target.exists(), f"{doc.relative_to(ROOT)}: link to a missing {target.relative_to(ROOT)}"
        if anchor:
            assert anchor in anchors(target), f"{doc.relative_to(ROOT)}: no #{anchor} in {target.name}"


def test_the_readme_links_every_doc() -> None:
    linked = {target for target, _ in links(ROOT / "README.md")}
    for doc in DOCS:
        if doc.name != "README.md":
            assert doc in linked, f"README.md does not link {doc.relative_to(ROOT)}"


def test_every_metric_is_in_the_metrics_doc() -> None:
    from prometheus_client import CollectorRegistry

    from agent.metrics import AgentMetrics
    from controller.metrics import ControllerMetrics

    registry = CollectorRegistry()
    AgentMetrics(registry)
    ControllerMetrics(registry)
    table = {
        name
        for line in (ROOT / "docs" / "metrics.md").read_text().splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`(modelcache_[a-z_]+)", line.split("|")[1])
    }
    # A counter's family is named without _total; its sample (what the table names) has it.
    exposed = {m.name + "_total" if m.type == "counter" else m.name for m in registry.collect()}
    assert exposed == table
