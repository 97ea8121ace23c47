"""TLS for the gateway's public ports (``CHARAI_TLS_CERT_FILE`` / ``CHARAI_TLS_KEY_FILE``).

One certificate serves both ports: gRPC (``grpc.ssl_server_credentials``) and HTTP (an
``ssl.SSLContext`` for aiohttp: gRPC-web, REST, media, health, the console).

The gRPC-web and REST bridge does not go through the TLS port. It reaches the servicer through a
second, plaintext gRPC port bound to 127.0.0.1 only, on the same server (same interceptors, so
the same authentication and limits). Why not TLS on loopback too: traffic that never leaves the
kernel gains nothing from encryption, and a certificate issued for the public host name (the usual
case, by a CA) does not name 127.0.0.1, so the bridge would have to switch off the very name
check that makes TLS worth having.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import grpc
from charai.core.settings import refuse
from charai.gateway.settings import Settings


def load_tls(settings: Settings) -> TlsFiles | None:
    """The certificate and key the settings name, read and checked (a bad file stops start-up
    naming its setting); None: the public ports speak plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return TlsFiles.load(settings.tls_cert_file, settings.tls_key_file)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A certificate chain and its private key, read and checked once at start."""

    cert_file: Path
    key_file: Path
    cert_pem: bytes = dataclasses.field(repr=False)
    key_pem: bytes = dataclasses.field(repr=False)

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> TlsFiles:
        """Reads both files and checks that they make a usable server identity; anything wrong
        stops start-up with a message naming the setting (never the key's content)."""
        cert_pem = _read(cert_file, "CHARAI_TLS_CERT_FILE")
        key_pem = _read(key_file, "CHARAI_TLS_KEY_FILE")
        files = cls(cert_file, key_file, cert_pem, key_pem)
        files.ssl_context()  # a bad PEM or a key that does not match the certificate fails here
        return files

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTP port's server context: TLS 1.2 or later, HTTP/1.1 by ALPN."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            refuse(
                "gateway: CHARAI_TLS_CERT_FILE / CHARAI_TLS_KEY_FILE are not a PEM certificate and "
                f"its matching private key ({type(exc).__name__}: {getattr(exc, 'reason', None) or exc})"
            )
        context.set_alpn_protocols(["http/1.1"])
        return context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """The gRPC port's credentials (no client certificates asked for: clients use bearer
        tokens)."""
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def _read(path: Path, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        refuse(f"gateway: cannot read {setting} ({path}: {exc.strerror})")
    if b"-----BEGIN" not in data:
        refuse(f"gateway: {setting} ({path}) is not a PEM file")
    return data
