"""The agent's planner: tables for each rule, properties for the invariants."""

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.planner import Disk, Want, plan
from localmodel.layout import storage_key

G = 2**30


def w(name: str, declared: int, real: int | None = None) -> Want:
    return Want(name, storage_key(f"hf://org/{name}"), declared * G, None if real is None else real * G)


def test_keep_download_delete() -> None:
    a, b = w("a", 10), w("b", 10)
    p = plan(
        (a, b),
        Disk(published={a.key: 10 * G, "0" * 16: 5 * G}, staged={"1" * 16: G}, free=100 * G),
        limit=100 * G,
    )
    assert p.keep == ("a",) and p.download == ("b",)
    assert p.delete == ("0" * 16, "1" * 16)
    assert p.used == 20 * G and p.available == 80 * G


def test_refused_over_group_limit_names_the_numbers() -> None:
    a, b = w("a", 60), w("b", 50)
    p = plan((a, b), Disk(published={a.key: 60 * G}, free=500 * G), limit=100 * G)
    (r,) = p.refuse
    assert r.name == "b" and r.reason == "InsufficientStorage"
    assert r.message == "needs 50Gi, 40Gi of the node group's 100Gi limit is available"
    assert p.keep == ("a",)  # never evicted to make room


def test_refused_when_the_disk_is_fuller_than_the_limit_says() -> None:
    p = plan((w("a", 10),), Disk(published={}, free=4 * G), limit=100 * G)
    assert p.refuse[0].message == "needs 10Gi, 4Gi free on the cache's filesystem is available"


def test_staged_bytes_reduce_what_must_still_fit_on_disk() -> None:
    a = w("a", 10)
    p = plan(
        (a,), Disk(published={}, staged={a.key: 8 * G}, free=3 * G), limit=None, in_flight=frozenset({a.key})
    )
    assert p.download == ("a",) and p.delete == ()


def test_deleting_unwanted_frees_space_for_wanted() -> None:
    a = w("a", 10)
    p = plan((a,), Disk(published={"f" * 16: 20 * G}, free=5 * G), limit=30 * G)
    assert p.delete == ("f" * 16,) and p.download == ("a",)


def test_real_size_bigger_than_declared() -> None:
    fits = plan((w("a", 10, real=12),), Disk(published={}, free=100 * G), limit=100 * G)
    assert fits.download == ("a",) and "more than the declared modelSize 10Gi" in fits.warnings["a"]
    tight = plan((w("a", 10, real=12),), Disk(published={}, free=100 * G), limit=11 * G)
    assert tight.refuse[0].reason == "SizeExceedsDeclared"
    assert "holds 12Gi, more than the declared modelSize 10Gi" in tight.refuse[0].message


def test_in_flight_keeps_its_reservation_first() -> None:
    z, a = w("z", 60), w("a", 60)
    p = plan((a, z), Disk(published={}, free=500 * G), limit=100 * G, in_flight=frozenset({z.key}))
    assert p.download == ("z",) and [r.name for r in p.refuse] == ["a"]


def test_in_flight_unwanted_is_not_deleted_by_the_plan() -> None:
    # The loop cancels the download first; the plan never removes what a task is still writing.
    p = plan(
        (), Disk(published={}, staged={"a" * 16: G}, free=G), limit=None, in_flight=frozenset({"a" * 16})
    )
    assert p.delete == ()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 50), st.one_of(st.none(), st.integers(1, 60)), st.booleans(), st.booleans()),
        max_size=8,
    ),
    st.lists(st.integers(1, 40), max_size=4),
    st.integers(0, 400),
    st.one_of(st.none(), st.integers(0, 300)),
)
def test_invariants(
    models: list[tuple[int, int | None, bool, bool]], orphans: list[int], free: int, limit: int | None
) -> None:
    wants = tuple(
        Want(f"m{i}", f"{i:016x}", d * G, None if r is None else r * G)
        for i, (d, r, _, _) in enumerate(models)
    )
    published = {x.key: x.need for x, (_, _, pub, _) in zip(wants, models) if pub}
    published.update({f"f{j:015x}": s * G for j, s in enumerate(orphans)})
    p = plan(wants, Disk(published=published, free=free * G), limit=None if limit is None else limit * G)
    names = {x.name for x in wants}
    decided = list(p.keep) + list(p.download) + [r.name for r in p.refuse]
    assert sorted(decided) == sorted(names)  # each wanted model decided exactly once
    wanted_keys = {x.key for x in wants}
    assert not set(p.delete) & wanted_keys  # never deletes a wanted model
    assert set(p.delete) == set(published) - wanted_keys
    if limit is not None:
        kept_bytes = sum(published[x.key] for x in wants if x.name in p.keep)
        assert p.used <= max(limit * G, kept_bytes)  # downloads never push past the limit
