"""What Kubernetes accepts as an object's name and a Secret's key, pure: checked before a name goes
into an API path or a request, so a crafted name can never change which object is read.

Rules (k8s.io/apimachinery/pkg/util/validation/validation.go and
pkg/api/validation/path/name.go, as the API server applies them):

- a DNS-1123 subdomain (Secrets, ServiceAccounts and most kinds): at most 253 characters of
  lowercase letters, digits, ``-`` and ``.``, each ``.``-separated part starting and ending with a
  letter or digit;
- a path segment (any name in a URL): not ``.`` nor ``..``, no ``/`` nor ``%``;
- a Secret's data key (``IsConfigMapKey``): at most 253 characters of letters, digits, ``-``,
  ``_`` and ``.``, not ``.`` nor ``..``.

Each check returns why the value is refused (never echoing more than its first 80 characters,
printable), or None.
"""

from __future__ import annotations

import re

from localmodel.text import printable

MAX_SUBDOMAIN = 253
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def _shown(value: str) -> str:
    return repr(printable(value[:80]))


def subdomain_error(name: str) -> str | None:
    """Why ``name`` is not a DNS-1123 subdomain (the module's rule), or None."""
    if len(name) <= MAX_SUBDOMAIN and _SUBDOMAIN.fullmatch(name):
        return None
    return (
        f"{_shown(name)} is not a Kubernetes object name (lowercase letters, digits, '-' and '.', "
        f"at most {MAX_SUBDOMAIN}, starting and ending with a letter or digit)"
    )


def path_segment_error(name: str) -> str | None:
    """Why ``name`` cannot be a name in an API path (the module's rule), or None."""
    if not name:
        return "an empty name"
    if name in (".", ".."):
        return f"{name!r} may not be a name"
    if "/" in name or "%" in name:
        return f"{_shown(name)} may not contain '/' or '%'"
    return None


def config_key_error(key: str) -> str | None:
    """Why ``key`` is not a key a Secret's data may hold (the module's rule), or None."""
    if key not in (".", "..") and len(key) <= MAX_SUBDOMAIN and _CONFIG_KEY.fullmatch(key):
        return None
    return (
        f"{_shown(key)} is not a Secret key (letters, digits, '-', '_' and '.', at most "
        f"{MAX_SUBDOMAIN}, not '.' or '..')"
    )
