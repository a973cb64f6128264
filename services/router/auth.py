"""API keys of the router's public API (gRPC and HTTP alike), and the tenant each key stands for.

Keys come from `--api-key` (PDMESH_API_KEYS: comma-separated keys, no tenant) and from
`--api-keys-file` (PDMESH_API_KEYS_FILE: YAML or JSON mapping each key to its tenant, e.g.
`{"sk-team-a-1": "team-a", "sk-ops": ""}`; "" = no tenant). When any key is configured, every
request must carry one (gRPC metadata `authorization: Bearer <key>`, the same HTTP header), else
UNAUTHENTICATED. A key with a tenant sets the request's tenant; a request naming another tenant
is refused with PERMISSION_DENIED.
"""

import hmac
import pathlib
from typing import NamedTuple

import yaml

from services.common.errors import PermissionDenied, Unauthenticated

SEND_A_KEY = "send `Authorization: Bearer <key>` (the HTTP header; in gRPC the metadata key `authorization`)"


class ApiKeys(NamedTuple):
    tenants: tuple[tuple[bytes, str], ...] = ()  # (key, tenant or "")

    @classmethod
    def load(cls, keys: tuple[str, ...] = (), keys_file: str | None = None) -> "ApiKeys":
        pairs = [(key, "") for key in keys]
        if keys_file:
            pairs += _read_keys_file(keys_file)
        return cls(tuple((key.encode(), tenant) for key, tenant in pairs))

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def tenant_of(self, authorization: str | None) -> str:
        """The tenant of the key in an `authorization` value ("" for a key without one); raises
        Unauthenticated when keys are configured and the value carries none of them."""
        if not self.enabled:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"missing API key: {SEND_A_KEY}")
        token_bytes, found = token.strip().encode(), None
        for key, tenant in self.tenants:  # compare with every key: the time taken does not say which matched
            if hmac.compare_digest(token_bytes, key) and found is None:
                found = tenant
        if found is None:
            raise Unauthenticated(f"wrong API key: {SEND_A_KEY} with a key this router knows")
        return found

    def authorize(self, authorization: str | None, requested_tenant: str) -> str:
        """The tenant the request runs as: the key's (a request may repeat it or leave it empty), or
        the requested one for a key without a tenant (and when no keys are configured)."""
        tenant = self.tenant_of(authorization)
        if not tenant:
            return requested_tenant
        if requested_tenant and requested_tenant != tenant:
            raise PermissionDenied(f"tenant {requested_tenant!r} does not match this API key's tenant {tenant!r}: "
                                   "leave the tenant empty or send the key's")
        return tenant


def _read_keys_file(path: str) -> list[tuple[str, str]]:
    try:
        data = yaml.safe_load(pathlib.Path(path).read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise ValueError(f"the API keys file {path} must map each key to its tenant, e.g. {{\"sk-a\": \"team-a\"}}")
    pairs = []
    for key, tenant in data.items():
        if not isinstance(key, str) or not key.strip() or not isinstance(tenant, (str, type(None))):
            raise ValueError(f"the API keys file {path}: each key must be a non-empty string mapped to a tenant "
                             f"string (or empty), got {key!r}: {tenant!r}")
        pairs.append((key.strip(), tenant or ""))
    return pairs
