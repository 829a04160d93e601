"""Hugging Face sources: huggingface_hub resolves the revision to a commit sha (pinned for the whole
download, so a push meanwhile cannot mix revisions) and lists the tree with sizes and LFS sha256.
Files are then fetched from ``/{repo}/resolve/{sha}/{path}`` by the engine. The one place
huggingface_hub's errors are mapped into the project's tree."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent.download.http_status import http_status_error, retry_after_seconds
from agent.download.listing import MAX_PAGES, Listing, RemoteFile, check_unique, checked_path
from agent.download.source_settings import SourceSettings, check_source_endpoint, no_answer
from agent.download.wording import connection_words
from localmodel.errors import AccessDenied, DownloadError, SourceNotFound, TransientError
from localmodel.text import printable
from localmodel.uri import SourceURI


def list_hf(uri: SourceURI, settings: SourceSettings) -> Listing:
    from httpx2 import ConnectTimeout, HTTPError, TimeoutException
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.hf_api import RepoFile

    _bound_hf_client(settings)
    source = uri.redacted()
    check_source_endpoint(settings.hf_endpoint, settings, source)
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token or False)
    revision = uri.revision or "main"
    _hf_answer.pages = _Pages(source, time.monotonic() + settings.list_deadline, settings.list_deadline)
    try:
        # model_info passes its own timeout (None: none at all) over the client's: give it ours.
        info = api.model_info(uri.repo_id, revision=revision, timeout=settings.read_timeout)
        sha = info.sha
        if not sha:
            raise SourceNotFound(f"{source}: the hub did not say which commit {revision!r} is")
        tree = list(api.list_repo_tree(uri.repo_id, revision=sha, recursive=True, expand=False))
    except GatedRepoError as e:
        raise AccessDenied(
            f"access denied to {uri.repo_id}: the repository is gated; accept its terms on the "
            "hub and set HF_TOKEN (or the cache's storage secret)"
        ) from e
    except RevisionNotFoundError as e:
        raise SourceNotFound(f"{source}: revision {revision!r} not found in {uri.repo_id}") from e
    except RepositoryNotFoundError as e:
        # The hub answers 401/404 alike for private repos without a token.
        hint = "" if settings.hf_token else " (or private: set HF_TOKEN)"
        raise AccessDenied(f"access denied to {uri.repo_id}: not found{hint}") from e
    except HfHubHTTPError as e:
        raise http_status_error(source, _status(e), _retry_after(e)) from e
    except ConnectTimeout as e:
        raise no_answer(source, settings.hf_endpoint, settings.connect_timeout, "no connection") from e
    except TimeoutException as e:
        raise no_answer(source, settings.hf_endpoint, settings.read_timeout) from e
    except (OSError, HTTPError) as e:  # connection errors of the hub's HTTP client
        raise TransientError(f"{source}: {connection_words(e, settings.hf_endpoint)}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a body that is not the API's JSON
        raise _not_the_hub(settings.hf_endpoint) from e
    finally:
        _hf_answer.pages = None
    headers = {"Authorization": f"Bearer {settings.hf_token}"} if settings.hf_token else {}
    files = []
    for entry in tree:
        if not isinstance(entry, RepoFile):
            continue
        path = checked_path(entry.path, source=source)
        url = f"{settings.hf_endpoint}/{uri.repo_id}/resolve/{sha}/{_quote(path)}"
        lfs = entry.lfs
        files.append(
            RemoteFile(
                path=path,
                size=int(entry.size),
                sha256=lfs.sha256 if lfs is not None else None,
                git_sha1=None if lfs is not None else entry.blob_id,
                url=url,
                headers=headers,
            )
        )
    result = tuple(sorted(files, key=lambda f: f.path))
    check_unique(result, source=source)
    return Listing(source=source, revision=sha, files=result)


_hf_lock = threading.Lock()
_hf_timeouts: tuple[float, float] | None = None


def _bound_hf_client(settings: SourceSettings) -> None:
    """Give huggingface_hub's shared HTTP client our timeouts, through its supported hook
    (``huggingface_hub.set_client_factory``): its default client waits forever (``timeout=None``),
    and ``list_repo_tree`` takes no timeout of its own. Set once per distinct pair of timeouts:
    setting a factory closes the shared client, which a listing in another thread may be using."""
    global _hf_timeouts
    wanted = (settings.connect_timeout, settings.read_timeout)
    with _hf_lock:
        if _hf_timeouts == wanted:
            return
        import httpx2
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils._http import default_client_factory

        def factory() -> httpx2.Client:
            client = default_client_factory()  # its event hooks and redirect handling, kept
            client.timeout = httpx2.Timeout(settings.read_timeout, connect=settings.connect_timeout)
            client.event_hooks.setdefault("response", []).append(_note_answer)
            return client

        set_client_factory(factory)
        _hf_timeouts = wanted


_hf_answer = threading.local()  # the last answer's (status, content type) in this listing thread


@dataclass
class _Pages:
    """One listing's pages, as its thread's answers arrive: huggingface_hub follows the ``Link:
    <...>; rel="next"`` header (utils/_pagination.py) without ever asking whether it was given that
    link before, nor for how long."""

    source: str
    deadline: float  # time.monotonic()
    seconds: float
    seen: set[str] = field(default_factory=set)


def _note_answer(response: Any) -> None:
    _hf_answer.last = (response.status_code, response.headers.get("content-type", "no content type"))
    pages: _Pages | None = getattr(_hf_answer, "pages", None)
    if pages is None:
        return  # not a listing thread
    following = response.links.get("next", {}).get("url")
    if following:
        if following in pages.seen:
            raise DownloadError(
                f"the listing of {pages.source} repeats page link '{printable(following[-64:])}'; "
                "the server is not following the protocol"
            )
        pages.seen.add(following)
    if len(pages.seen) > MAX_PAGES:
        raise DownloadError(f"the listing of {pages.source} goes past {MAX_PAGES:,} pages")
    if time.monotonic() > pages.deadline:
        raise TransientError(f"{pages.source}: no whole listing within {pages.seconds:g} s")


def _not_the_hub(endpoint: str) -> DownloadError:
    """The hub answered, but not with its JSON API: a portal or login page, a proxy's error page."""
    status, kind = getattr(_hf_answer, "last", (200, "not JSON"))
    return DownloadError(
        f"the hub at {endpoint} answered with something that is not its JSON API (HTTP {status}, "
        f"{printable(str(kind).split(';')[0], limit=60)}); check HF_ENDPOINT or the proxy"
    )


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _status(e: Any) -> int:
    response = getattr(e, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def _retry_after(e: Any) -> float | None:
    response = getattr(e, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    return retry_after_seconds(value)
