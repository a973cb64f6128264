"""TLS with mutual authentication between pdmesh services: the one place that builds server and
channel credentials, and the flags/environment that configure them.

Every service takes `--tls-cert`, `--tls-key`, `--tls-ca` (env PDMESH_TLS_CERT, PDMESH_TLS_KEY,
PDMESH_TLS_CA; all three or none) and optionally `--tls-server-name` (PDMESH_TLS_SERVER_NAME: the
name to expect in servers' certificates when peers are dialled by IP, e.g. pod IPs). With them a
server only accepts clients presenting a certificate signed by the CA, and every channel it opens
presents its own certificate and checks the server's against the same CA. Without them a service
serves and dials plaintext (the default, kept for local runs and existing deployments; it logs a
warning). `pdmesh certs --out DIR` makes a local CA and certificates.
"""

import argparse
import logging
import os
import pathlib
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    cert: str  # PEM certificate chain this process presents (as server and as client)
    key: str  # its private key
    ca: str  # PEM CA bundle peers' certificates must chain to
    server_name: str = ""  # expected name in servers' certificates ("" = the host dialled)

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if not pathlib.Path(path).is_file():
                raise ValueError(f"--tls-{name} {path!r} is not a readable file")

    def read(self) -> tuple[bytes, bytes, bytes]:
        return tuple(pathlib.Path(p).read_bytes() for p in (self.cert, self.key, self.ca))


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Server side of mTLS: clients must present a certificate signed by tls.ca."""
    cert, key, ca = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls: TlsConfig | None) -> grpc.ChannelCredentials | None:
    """Client side of mTLS (None for plaintext)."""
    if tls is None:
        return None
    cert, key, ca = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel_options(tls: TlsConfig | None, options: list | tuple = ()) -> list:
    extra = [("grpc.ssl_target_name_override", tls.server_name)] if tls is not None and tls.server_name else []
    return [*options, *extra]


def aio_channel(address: str, tls: TlsConfig | None, options: list | tuple = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to address: mTLS when tls is set, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=channel_options(tls, options))


def blocking_channel(address: str, tls: TlsConfig | None, options: list | tuple = ()) -> grpc.Channel:
    """A blocking grpc channel to address (for command-line clients): mTLS when tls is set, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, channel_credentials(tls), options=channel_options(tls, options))


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--tls-cert", default=env("PDMESH_TLS_CERT", ""), help="PEM certificate (enables mTLS)")
    parser.add_argument("--tls-key", default=env("PDMESH_TLS_KEY", ""), help="PEM private key")
    parser.add_argument("--tls-ca", default=env("PDMESH_TLS_CA", ""), help="PEM CA that peers' certificates chain to")
    parser.add_argument("--tls-server-name", default=env("PDMESH_TLS_SERVER_NAME", ""),
                        help="name expected in servers' certificates (default: the host dialled)")


def tls_from_args(args: argparse.Namespace, warn_plaintext: bool = True) -> TlsConfig | None:
    """TlsConfig from add_tls_flags' flags; None (plaintext) when none is set; ValueError when only some are."""
    given = {name: getattr(args, f"tls_{name}") for name in ("cert", "key", "ca")}
    if not any(given.values()):
        if warn_plaintext:
            log.warning("no --tls-cert/--tls-key/--tls-ca: serving and dialling plaintext")
        return None
    missing = [f"--tls-{name}" for name, value in given.items() if not value]
    if missing:
        raise ValueError(f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)}")
    return TlsConfig(**given, server_name=args.tls_server_name)
