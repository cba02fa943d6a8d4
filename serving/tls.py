"""HTTPS for the plane and the gateway, and how this project's own clients trust it.

Keys travel in the `Authorization` header, so a bind off loopback needs TLS: either served here
(`serve.tls_certfile` + `serve.tls_keyfile`, `python -m serving.gateway --tls-certfile
--tls-keyfile`; uvicorn terminates it) or terminated in front by an ingress, a load balancer or a
proxy (`serve.tls_offloaded`, `--tls-offloaded`, which says so on purpose). serving.gateway's
`exposure_problem` refuses the rest at start.

The project's own clients of a TLS plane (a release, `make rollback`, the alert receiver) verify
it against `serve.tls_ca_file`, else the certificate itself (right for a self-signed one): the
certificate must name the address they use (`serve.plane_url`, or 127.0.0.1 for 'auto').
`trust(url, cafile)` records that context for the plane's origin, and `serving.client.client`,
the OpenAI client a release's synthetic users send through, uses it for URLs there; any other
URL keeps the system's CAs.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

_TRUSTED: dict[str, ssl.SSLContext] = {}


def origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def files_problem(certfile: str | None, keyfile: str | None, names: tuple[str, str]) -> str | None:
    """Why these files cannot serve TLS (one missing, unreadable, not PEM, a key that does not
    match the certificate), naming the setting and the file; None when they load."""
    if not certfile and not keyfile:
        return None
    if not (certfile and keyfile):
        have, missing = (names[0], names[1]) if certfile else (names[1], names[0])
        return f"{have} is set but {missing} is not: TLS needs the certificate and its private key"
    for name, path in zip(names, (certfile, keyfile)):
        if not Path(path).is_file():
            return f"{name}: {path} does not exist (a PEM file; e.g. `openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1`)"
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        return f"{names[0]} {certfile} with {names[1]} {keyfile} do not load as a PEM certificate and its key ({exc})"
    return None


def server_kwargs(certfile: str | None, keyfile: str | None) -> dict[str, str]:
    """uvicorn's arguments for serving HTTPS (none for plain HTTP)."""
    return {"ssl_certfile": certfile, "ssl_keyfile": keyfile} if certfile and keyfile else {}


def trusted_ca(serve) -> str | None:
    """What this project's clients of a plane (ServeParams `serve`) verify it with:
    serve.tls_ca_file, else the certificate itself (right for a self-signed one); None without TLS."""
    return serve.tls_ca_file or serve.tls_certfile


def client_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def trust(url: str, cafile: str) -> ssl.SSLContext:
    """Verify `url`'s origin against `cafile` from now on in this process; the context."""
    context = _TRUSTED[origin(url)] = client_context(cafile)
    return context


def verify_for(url: str) -> ssl.SSLContext | bool:
    """What a client of `url` verifies it with: a trusted context for its origin, else the
    system's CAs (True)."""
    return _TRUSTED.get(origin(url), True)
