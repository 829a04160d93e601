"""What every source's listing is given (:class:`SourceSettings`, read from the environment at the
entry point), the Hugging Face token as huggingface_hub finds it, and the two rules every listing
shares: an endpoint checked before an SDK connects on its own, and the one line for no answer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.download.addresses import PrivateAddress, check_endpoint
from agent.download.azure import AzureSettings
from agent.download.gcs import GcsSettings
from agent.download.s3_settings import S3Settings
from localmodel.errors import InvalidInput, SourceNotAllowed, TransientError
from localmodel.text import printable

HF_DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class SourceSettings:
    """Read from the environment at the entry point (:meth:`from_env`), passed in everywhere else.

    Timeouts are in seconds, per connection attempt (``connect_timeout``) and per wait for the next
    bytes of an answer (``read_timeout``), for every listing and metadata request. ``file_prefixes``:
    the folders ``file://`` sources may be read from (real paths, symlinks resolved); ``None`` allows
    any (``pull`` and the standalone agent: the user's own machine), ``()`` none (the agent in a
    cluster without ``--allow-file-sources``).
    """

    hf_endpoint: str = HF_DEFAULT_ENDPOINT
    hf_token: str | None = dataclasses.field(default=None, repr=False)
    s3_endpoint: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    list_attempts: int = 4
    list_backoff: float = 1.0  # the first wait between listing attempts; doubles, capped at 30 s
    list_deadline: float = 120.0  # one whole listing attempt (every source), however it trickles or pages
    file_prefixes: tuple[str, ...] | None = None
    gcs: GcsSettings = dataclasses.field(default_factory=GcsSettings)
    azure: AzureSettings = dataclasses.field(default_factory=AzureSettings)
    # A cache's own S3 credentials and settings (agent.credentials); fields left None fall back on
    # the agent's environment and AWS profile, as boto3 finds them.
    s3: S3Settings = dataclasses.field(default_factory=S3Settings)
    # Off: the hub's and S3's endpoints must not resolve to a loopback, link-local or unspecified
    # address (addresses.check_endpoint; the agent in a cluster without --allow-private-sources).
    allow_private: bool = True

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        file_prefixes: tuple[str, ...] | None = None,
        allow_private: bool = True,
    ) -> SourceSettings:
        env = os.environ if env is None else env
        return cls(
            allow_private=allow_private,
            hf_endpoint=(env.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/"),
            hf_token=hf_token_from_env(env),
            s3_endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            file_prefixes=file_prefixes,
            gcs=GcsSettings.from_env(env),
            azure=AzureSettings.from_env(env),
        )


def hf_token_from_env(env: Mapping[str, str]) -> str | None:
    """The Hugging Face token as huggingface_hub finds it (``utils/_auth.py::get_token``): ``HF_TOKEN``,
    then ``HUGGING_FACE_HUB_TOKEN``, then the file ``HF_TOKEN_PATH`` names (default
    ``$HF_HOME/token``, ``HF_HOME`` defaulting to ``$XDG_CACHE_HOME/huggingface`` or
    ``~/.cache/huggingface``): a mounted Secret keeps the token out of ``/proc/<pid>/environ``.

    Cleaned as huggingface_hub's ``_clean_token`` does (every CR and LF dropped, surrounding
    whitespace stripped); an empty value or a missing file is no token. What is left must be
    printable ASCII without spaces (a header value; tokens are): anything else is InvalidInput
    naming where it came from, never the token. A file that ``HF_TOKEN_PATH`` names explicitly and
    that exists but cannot be read is InvalidInput."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if value := _clean_token(env.get(name) or ""):
            return _checked_token(value, name)
    explicit = env.get("HF_TOKEN_PATH")
    if explicit:
        path = Path(os.path.expandvars(explicit)).expanduser()
    else:
        cache = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME") or "~") / ".cache")
        home = Path(os.path.expandvars(env.get("HF_HOME") or cache / "huggingface")).expanduser()
        path = home / "token"
    try:
        token = _clean_token(path.read_text())
    except FileNotFoundError:
        return None  # as huggingface_hub: an optional Secret that is not there means no token
    except (OSError, UnicodeDecodeError) as e:
        if explicit:
            raise InvalidInput(
                f"HF_TOKEN_PATH: cannot read '{printable(explicit)}': {getattr(e, 'strerror', None) or e}"
            ) from None
        return None
    where = f"HF_TOKEN_PATH ('{printable(explicit)}')" if explicit else f"the token file {path}"
    return _checked_token(token, where) if token else None


def _clean_token(text: str) -> str:
    """huggingface_hub's ``_clean_token``: CR and LF removed wherever they are, then stripped."""
    return text.replace("\r", "").replace("\n", "").strip()


def _checked_token(token: str, where: str) -> str:
    """The token, if every character is printable ASCII other than a space (what an Authorization
    header can carry, as every Hugging Face token is); InvalidInput naming ``where``, never the token."""
    if all("!" <= c <= "~" for c in token):
        return token
    raise InvalidInput(
        f"{where}: the Hugging Face token holds a control character, a space or a non-ASCII "
        "character; write the token alone (one line) into the Secret"
    )


def check_source_endpoint(endpoint: str, settings: SourceSettings, source: str) -> None:
    """The listing client connects on its own: its endpoint is checked by name before it does
    (SourceNotAllowed for a private address unless ``settings.allow_private``)."""
    try:
        check_endpoint(endpoint, allow_private=settings.allow_private)
    except PrivateAddress as e:
        raise SourceNotAllowed(f"{source}: {e}") from e


def no_answer(source: str, endpoint: str, seconds: float, what: str = "no answer") -> TransientError:
    """``source: cannot reach ENDPOINT: WHAT within SECONDS s``."""
    return TransientError(f"{source}: cannot reach {endpoint}: {what} within {seconds:g} s")
