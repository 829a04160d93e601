"""Microsoft Entra ID (Azure AD) for tests: an OAuth2 token server for service principals, reached
as ``https://login.microsoftonline.com`` through an HTTPS proxy that tunnels there.

Why a proxy and not ``AZURE_AUTHORITY_HOST``: MSAL (under azure-identity's ClientSecretCredential)
validates an authority host it does not know by asking ``login.microsoftonline.com``'s instance
discovery endpoint (msal/authority.py, ``_initialize_entra_authority``), so a local authority host
cannot work offline without ``disable_instance_discovery=True``, which the product does not pass
(nor does KServe). Every process here honours ``HTTPS_PROXY`` (requests under azure-core does), so
the test sets it to :class:`Tunnel`, which sends ``CONNECT login.microsoftonline.com:443`` to the
local server; the server's certificate names login.microsoftonline.com and is trusted through
``REQUESTS_CA_BUNDLE``. The code under test runs as in production, default authority included.

The server speaks what MSAL's confidential client uses:

    GET  /{tenant}/v2.0/.well-known/openid-configuration   tenant discovery
    POST /{tenant}/oauth2/v2.0/token                       client_credentials grant: the client id
                                                           and secret checked (401 invalid_client,
                                                           AADSTS7000215, on a wrong secret; 400
                                                           AADSTS90002 on an unknown tenant)

Access tokens are JWTs as Entra issues them for storage (``aud`` https://storage.azure.com,
``iss`` https://sts.windows.net/{tenant}/, ``oid``, ``tid``, ``iat``/``nbf``/``exp``), signed with a
key of the server's own (Azurite's ``--oauth basic`` checks the claims, not the signature). Every
grant is recorded (client id, scope; never the secret).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.loopthread import LoopThread
from tests.support.tls import make_cert

LOGIN_HOST = "login.microsoftonline.com"


@dataclass(frozen=True)
class Grant:
    tenant: str
    client_id: str
    scope: str
    ok: bool


class Entra:
    """The token server and its tunnel. ``ca`` is the certificate to trust (it also names
    127.0.0.1, so a local HTTPS Azurite can share it: :attr:`cert`/:attr:`key`)."""

    def __init__(self, folder: Path) -> None:
        make_cert(folder, dns_names=(LOGIN_HOST,))
        self.cert, self.key = folder / "tls.crt", folder / "tls.key"
        self.ca = self.cert
        self.principals: dict[tuple[str, str], str] = {}  # (tenant, client id) -> secret
        self.grants: list[Grant] = []
        self.proxy_url = ""
        self._port = 0
        self._thread = LoopThread("entra")
        from cryptography.hazmat.primitives.asymmetric import ec

        self._signing_key = ec.generate_private_key(ec.SECP256R1())

    def add_principal(self, tenant: str, client_id: str, secret: str) -> None:
        self.principals[(tenant, client_id)] = secret

    def start(self) -> None:
        self._thread.run(self._start())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._thread.run(self._stop())
        self._thread.stop()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._tunnel = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.proxy_url = f"http://127.0.0.1:{self._tunnel.sockets[0].getsockname()[1]}"

    async def _stop(self) -> None:
        self._tunnel.close()
        await self._runner.cleanup()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """CONNECT login.microsoftonline.com:443 → the token server; anything else 403."""
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            method, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
            if method != "CONNECT" or target != f"{LOGIN_HOST}:443":
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _openid(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        base = f"https://{LOGIN_HOST}/{tenant}"
        return web.json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"https://{LOGIN_HOST}/{tenant}/v2.0",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        form = await request.post()
        client_id, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        scope = str(form.get("scope", ""))
        known = {t for t, _ in self.principals}
        expected = self.principals.get((tenant, client_id))
        ok = form.get("grant_type") == "client_credentials" and expected is not None and secret == expected
        self.grants.append(Grant(tenant, client_id, scope, ok))
        if tenant not in known:
            return _aad_error(400, "invalid_request", f"AADSTS90002: Tenant '{tenant}' not found.")
        if not ok:
            return _aad_error(
                401,
                "invalid_client",
                f"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
                f"request is the client secret value, not the client secret ID, for a secret added "
                f"to app '{client_id}'.",
            )
        now = int(time.time())
        claims = {
            "aud": "https://storage.azure.com",
            "iss": f"https://sts.windows.net/{tenant}/",
            "iat": now,
            "nbf": now - 60,
            "exp": now + 3600,
            "appid": client_id,
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)),
            "tid": tenant,
            "ver": "1.0",
        }
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": 3599,
                "ext_expires_in": 3599,
                "access_token": self._jwt(claims),
            }
        )

    def _jwt(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        head = b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": "entra-test"}).encode())
        body = b64(json.dumps(claims).encode())
        der = self._signing_key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{head}.{body}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _aad_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response(
        {
            "error": error,
            "error_description": description,
            "error_codes": [int(description[6:13])],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
        },
        status=status,
    )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()
