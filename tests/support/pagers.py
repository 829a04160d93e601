"""Listing servers that page without end, on 127.0.0.1, for tests (after /work's attack servers of
issue 19): the GCS JSON API's object listing, Azure Blob's List Blobs and the hub's tree listing,
each answering every request with one more page. ``mode``: ``"loop"`` gives the same continuation
token (``nextPageToken``, ``NextMarker``, ``Link: rel="next"``) every time, ``"endless"`` an empty
page with a new one every time. ``requests`` counts what was asked, ``asked`` lists it."""

from __future__ import annotations

from aiohttp import web

from tests.support.loopthread import LoopThread

AZURE_PAGE = """<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="http://x/" \
ContainerName="c"><Prefix>m/</Prefix><MaxResults>5000</MaxResults><Blobs>{blobs}</Blobs>\
<NextMarker>{marker}</NextMarker></EnumerationResults>"""
AZURE_BLOB = """<Blob><Name>m/a.bin</Name><Properties><Last-Modified>Mon, 01 Jan 2024 00:00:00 GMT\
</Last-Modified><Etag>0x1</Etag><Content-Length>10</Content-Length><Content-Type>application/\
octet-stream</Content-Type><BlobType>BlockBlob</BlobType></Properties></Blob>"""


class Pager:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.asked: list[str] = []  # each request's method and path with its query
        self._thread = LoopThread("pager")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._thread.run(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._thread.run(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._thread.run(self._runner.cleanup())
        self._thread.stop()

    def _token(self) -> str:
        return "T0" if self.mode == "loop" else f"T{self.requests}"

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.asked.append(f"{request.method} {request.path_qs}")
        path = request.path
        if request.query.get("comp") == "list":  # Azure List Blobs
            blobs = AZURE_BLOB if self.mode == "loop" else ""
            body = AZURE_PAGE.format(blobs=blobs, marker=self._token())
            return web.Response(body=body.encode(), content_type="application/xml")
        if path.startswith("/storage/v1/b/") and path.endswith("/o"):  # GCS objects.list
            items = []
            if self.mode == "loop":
                items = [{"kind": "storage#object", "name": "m/a.bin", "bucket": "b", "generation": "1",
                          "size": "1"}]  # fmt: skip
            return web.json_response(
                {"kind": "storage#objects", "items": items, "nextPageToken": self._token()}
            )
        if path.startswith("/api/models/") and "/revision/" in path:  # the hub's model_info
            return web.json_response({"id": "o/m", "sha": "0" * 40, "siblings": []})
        if path.startswith("/api/models/") and "/tree/" in path:  # the hub's tree, paged by Link
            nxt = f"{self.endpoint}{path}?cursor={self._token()}"
            return web.json_response([], headers={"Link": f'<{nxt}>; rel="next"'})
        return web.json_response({"error": {"code": 404, "message": "no such thing"}}, status=404)
