"""Kubernetes resource quantities ("500Gi", "1.7T", "10G", "1e3"), parsed and formatted as Kubernetes does.

The grammar (k8s.io/apimachinery/pkg/api/resource)::

    <quantity> ::= <signedNumber><suffix>
    <number>   ::= <digits> | <digits>.<digits> | <digits>. | .<digits>
    <suffix>   ::= <binarySI> | <decimalExponent> | <decimalSI>
    <binarySI> ::= Ki | Mi | Gi | Ti | Pi | Ei
    <decimalSI> ::= m | "" | k | M | G | T | P | E        (also n and u, as Kubernetes accepts)
    <decimalExponent> ::= "e" <signedNumber> | "E" <signedNumber>

Values are exact (fractions); :attr:`Quantity.bytes` rounds up like ``Quantity.Value()``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from localmodel.errors import InvalidInput, QuantityError

Format = Literal["BinarySI", "DecimalSI", "DecimalExponent"]

_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_RE = re.compile(
    r"(?P<sign>[+-]?)(?P<num>\d+\.?\d*|\.\d+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|[numkMGTPE]?)"
)
# Kubernetes bounds exponents too; without a bound "1e999999999" would build a billion-digit number.
_MAX_DECIMAL_EXPONENT = 40
_MAX_DIGITS = 64


@dataclass(frozen=True)
class Quantity:
    """An exact quantity; equal when the values are equal, whatever the spelling."""

    value: Fraction
    format: Format = field(default="BinarySI", compare=False)
    original: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: object, *, field: str = "quantity") -> Quantity:
        if isinstance(text, bool):
            raise QuantityError(f"{field}: {text!r} is not a quantity")
        if isinstance(text, int):
            return cls(Fraction(text), "DecimalSI", str(text))
        if isinstance(text, float):
            if not math.isfinite(text):
                raise QuantityError(f"{field}: {text!r} is not a quantity")
            text = repr(text)
        if not isinstance(text, str):
            raise QuantityError(f"{field}: expected a quantity like 500Gi or 10G, got {text!r}")
        m = _RE.fullmatch(text.strip())
        if m is None or not text.strip():
            raise QuantityError(
                f"{field}: {text!r} is not a Kubernetes quantity (examples: 500Gi, 1.7T, 10G, 1e3)"
            )
        sign, num, suffix = m["sign"], m["num"], m["suffix"]
        if len(num) > _MAX_DIGITS:
            raise QuantityError(f"{field}: {text!r} has too many digits")
        base = Fraction(num) if num != "." else Fraction(0)
        value, fmt = _scaled(base, suffix, f"{field}: {text!r} is out of range")
        if (value * 10**9).denominator != 1:
            # Finer than nano: Kubernetes rounds it up to the next nano when it parses
            # (apimachinery resource.Quantity), so the canonical text parses back to the same value.
            value = Fraction(math.ceil(value * 10**9), 10**9)
        if sign == "-":
            value = -value
        return cls(value, fmt, text)

    @classmethod
    def from_bytes(cls, n: int) -> Quantity:
        return cls(Fraction(n), "BinarySI")

    @property
    def bytes(self) -> int:
        """The value as a whole number, rounded up (Kubernetes' ``Value()``)."""
        return math.ceil(self.value)

    def __str__(self) -> str:
        return format_quantity(self.value, self.format)

    def to_json(self) -> str:
        """What to store: the user's spelling when we have it, else the canonical form."""
        return self.original if self.original is not None else str(self)


def _scaled(base: Fraction, suffix: str, out_of_range: str) -> tuple[Fraction, Format]:
    """The number times its suffix, and the suffix's format; QuantityError(``out_of_range``) for a
    decimal exponent beyond the bound."""
    if suffix in _BINARY:
        return base * (1 << _BINARY[suffix]), "BinarySI"
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        exp = int(suffix[1:])
        if abs(exp) > _MAX_DECIMAL_EXPONENT:
            raise QuantityError(out_of_range)
        return base * Fraction(10) ** exp, "DecimalExponent"
    return base * Fraction(10) ** _DECIMAL[suffix], "DecimalSI"


def format_quantity(value: Fraction | int, fmt: Format = "BinarySI") -> str:
    """Canonical text, as Kubernetes' ``String()``: the largest suffix that keeps an exact integer."""
    value = Fraction(value)
    sign = "-" if value < 0 else ""
    mag = abs(value)
    if fmt == "BinarySI" and mag.denominator == 1 and mag >= 1024:
        n = mag.numerator
        for suffix, shift in sorted(_BINARY.items(), key=lambda kv: -kv[1]):
            if n % (1 << shift) == 0:
                return f"{sign}{n >> shift}{suffix}"
    # Decimal: pick the exponent (multiple of 3) that gives an integer mantissa, rounding up to
    # nano like Kubernetes does for values finer than that.
    if mag.denominator != 1:
        nanos = math.ceil(mag * 10**9)
        mag = Fraction(nanos, 10**9)
    exp = 0
    if mag == 0:
        return "0"
    while mag.denominator != 1 and exp > -9:
        mag *= 1000
        exp -= 3
    n = int(mag)
    while n % 1000 == 0 and exp < 18:
        n //= 1000
        exp += 3
    if fmt == "DecimalExponent":
        return f"{sign}{n}" + (f"e{exp}" if exp else "")
    suffix = {v: k for k, v in _DECIMAL.items()}[exp]
    return f"{sign}{n}{suffix}"


def readable(n: int) -> str:
    """Bytes for people, in binary units with one decimal ("2.9 MiB"); not a Quantity."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- command-line rates and sizes (the transfer flags of `modelcache pull` and `modelcache agent`) --


def _quantity_text(text: str) -> str:
    """A rate as people write it -> a Kubernetes quantity: '/s' and a 'B' after the unit dropped, and
    'K' read as the decimal kilo 'k' (200K, 200KB/s and 200kB/s are all 200,000 bytes/s; Ki is
    1024)."""
    cleaned = text.strip().removesuffix("/s").removesuffix("B")
    return cleaned[:-1] + "k" if cleaned.endswith("K") else cleaned


# The highest rate a transfer flag takes, in bytes per second: 1 TB/s, far above any NIC or disk.
# Beyond it a cap means nothing, and the figures derived from it (socket buffers, copy steps) stop
# fitting the C integers the kernel takes.
MAX_RATE = 10**12


def parse_rate(text: str, *, flag: str = "--max-bandwidth") -> float:
    """'100M', '1.5Gi', '200MB/s', '50MiB/s', '200K' -> bytes per second, greater than zero and at
    most :data:`MAX_RATE`; InvalidInput naming ``flag`` otherwise."""
    cleaned = _quantity_text(text)
    try:
        value = Quantity.parse(cleaned, field=flag)
    except QuantityError:
        raise InvalidInput(
            f"{flag}: {text!r} is not a rate; use bytes per second like 50kB/s, 100MB/s or "
            "1GiB/s (k, M, G: powers of 1000; Ki, Mi, Gi: of 1024; B and /s optional)"
        ) from None
    if value.value <= 0:
        raise InvalidInput(f"{flag}: {text!r} must be greater than zero")
    if value.value > MAX_RATE:
        raise InvalidInput(
            f"{flag}: {text!r} is more than 1TB/s, which caps nothing; leave the flag out for no cap"
        )
    return float(value.value)


def parse_size(text: str) -> int:
    try:
        value = Quantity.parse(text, field="--chunk-size").bytes
    except QuantityError as e:
        raise InvalidInput(str(e)) from None
    if value < 64 << 10:
        raise InvalidInput(f"--chunk-size: {text!r} is too small (at least 64Ki)")
    return value


def parse_low_speed_limit(text: str) -> int:
    """'1024', '1Ki', '10K' -> bytes per second, at most :data:`MAX_RATE`; 0 turns the check off."""
    try:
        value = Quantity.parse(_quantity_text(text), field="--low-speed-limit")
    except QuantityError:
        raise InvalidInput(
            f"--low-speed-limit: {text!r} is not a rate; use bytes per second like 1Ki or 10K (0: off)"
        ) from None
    if value.value < 0:
        raise InvalidInput(f"--low-speed-limit: {text!r} must not be negative")
    if value.value > MAX_RATE:
        raise InvalidInput(f"--low-speed-limit: {text!r} is more than 1TB/s, which no connection reaches")
    return int(value.value)
