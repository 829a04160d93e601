from fractions import Fraction

import pytest

from localmodel.errors import QuantityError
from localmodel.quantity import Quantity, format_quantity

# (text, exact value, canonical string) — canonical forms as Kubernetes' Quantity.String() gives them
CASES = [
    ("1.7T", 1_700_000_000_000, "1700G"),
    ("500Gi", 500 * 2**30, "500Gi"),
    ("10G", 10**10, "10G"),
    ("1e3", 1000, "1e3"),
    ("1E3", 1000, "1e3"),
    ("1E", 10**18, "1E"),
    ("1.5Gi", 1536 * 2**20, "1536Mi"),
    ("0", 0, "0"),
    ("5.", 5, "5"),
    (".5", Fraction(1, 2), "500m"),
    ("100m", Fraction(1, 10), "100m"),
    ("1Ki", 1024, "1Ki"),
    ("1024", 1024, "1024"),
    ("-1Mi", -(2**20), "-1Mi"),
    ("+2k", 2000, "2k"),
    ("1e-3", Fraction(1, 1000), "1e-3"),
    ("12Ei", 12 * 2**60, "12Ei"),
    ("3u", Fraction(3, 10**6), "3u"),
]


@pytest.mark.parametrize(("text", "value", "canonical"), CASES)
def test_parse_and_format(text: str, value: Fraction | int, canonical: str) -> None:
    q = Quantity.parse(text)
    assert q.value == value
    assert str(q) == canonical
    assert q.to_json() == text  # the user's spelling is what gets stored
    assert Quantity.parse(str(q)) == q  # canonical form round-trips


@pytest.mark.parametrize(
    "text",
    ["", " ", "Gi", "10Gbytes", "1K", "1e", "1.2.3", ".", "1 Gi", "Gi10", "1ki", "--1", "1e3Gi"],
)
def test_rejects(text: str) -> None:
    with pytest.raises(QuantityError, match="quantity"):
        Quantity.parse(text, field="spec.modelSize")


def test_error_names_field() -> None:
    with pytest.raises(QuantityError, match=r"^spec\.storageLimit: '10Gbytes'"):
        Quantity.parse("10Gbytes", field="spec.storageLimit")


def test_bytes_round_up_and_numbers() -> None:
    assert Quantity.parse("100m").bytes == 1
    assert Quantity.parse(7).bytes == 7
    assert Quantity.parse(1.5).bytes == 2
    with pytest.raises(QuantityError):
        Quantity.parse(True)
    with pytest.raises(QuantityError):
        Quantity.parse(float("inf"))


def test_huge_exponent_is_refused_not_computed() -> None:
    with pytest.raises(QuantityError, match="out of range"):
        Quantity.parse("1e999999999")


def test_equality_is_by_value() -> None:
    assert Quantity.parse("1Ki") == Quantity.parse("1024")
    assert Quantity.parse("1k") != Quantity.parse("1Ki")


def test_format_binary_falls_back_to_decimal() -> None:
    assert format_quantity(1000, "BinarySI") == "1k"
    assert format_quantity(1536, "BinarySI") == "1536"  # not a whole Ki multiple of a bigger unit
    assert format_quantity(2048, "BinarySI") == "2Ki"


def test_finer_than_nano_rounds_up_as_kubernetes_does() -> None:
    # Hypothesis found ".1n": its canonical form "1n" must parse to the same value.
    q = Quantity.parse(".1n")
    assert str(q) == "1n" and Quantity.parse(str(q)) == q
    assert Quantity.parse("-0.1n") == Quantity.parse("-1n")
