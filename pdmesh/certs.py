"""`pdmesh certs --out DIR`: a local CA and certificates for a local mTLS run, made with the
`openssl` command line tool.

    DIR/ca.pem, ca.key          the CA (keep ca.key private; only ca.pem is handed out)
    DIR/mesh.pem, mesh.key      every service's certificate: server and client use (router,
                                prefill, decode), names localhost, 127.0.0.1, ::1 and --name
    DIR/client.pem, client.key  a client's certificate (pdmesh generate, your own clients)

Each is ECDSA P-256, valid for --days (default 365). Point the services at them with
`--tls-cert DIR/mesh.pem --tls-key DIR/mesh.key --tls-ca DIR/ca.pem` (or `pdmesh up --tls DIR`).
"""

import pathlib
import shutil
import subprocess
import tempfile

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


def make_certs(out: str | pathlib.Path, names: tuple[str, ...] = (), days: int = 365) -> dict[str, pathlib.Path]:
    """Writes the CA and the mesh and client certificates into out; returns their paths by name."""
    if shutil.which("openssl") is None:
        raise RuntimeError("`openssl` is not installed; install it (e.g. apt-get install openssl)")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", out / "ca.key", "-out", out / "ca.pem", "-days", str(days), "-subj", "/CN=pdmesh local CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _leaf(out, "mesh", "pdmesh-mesh", (*DEFAULT_NAMES, *names), "serverAuth,clientAuth", days)
    _leaf(out, "client", "pdmesh-client", (), "clientAuth", days)
    for key in out.glob("*.key"):
        key.chmod(0o600)
    return {name: out / name for name in ("ca.pem", "mesh.pem", "mesh.key", "client.pem", "client.key")}


def _leaf(out: pathlib.Path, name: str, common_name: str, names: tuple[str, ...], usage: str, days: int) -> None:
    extensions = [f"extendedKeyUsage={usage}", "basicConstraints=critical,CA:FALSE",
                  "keyUsage=critical,digitalSignature,keyEncipherment"]
    if names:
        extensions.append("subjectAltName=" + ",".join(f"{'IP' if _is_ip(n) else 'DNS'}:{n}" for n in names))
    with tempfile.TemporaryDirectory() as tmp:
        csr, ext = pathlib.Path(tmp) / "leaf.csr", pathlib.Path(tmp) / "leaf.ext"
        ext.write_text("\n".join(extensions) + "\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", out / f"{name}.key", "-out", csr, "-subj", f"/CN={common_name}")
        _openssl("x509", "-req", "-in", csr, "-CA", out / "ca.pem", "-CAkey", out / "ca.key", "-CAcreateserial",
                 "-out", out / f"{name}.pem", "-days", str(days), "-sha256", "-extfile", ext)


def _is_ip(name: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _openssl(*args) -> None:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")
