"""API keys and tenants (services/router/auth.py) and the TLS flags (services/common/tls.py)."""

import argparse

import pytest

from services.common.errors import PermissionDenied, Unauthenticated
from services.common.tls import add_tls_flags, tls_from_args
from services.router.auth import ApiKeys


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("sk-a: team-a\nsk-open: ''\n")
    return ApiKeys.load(("sk-legacy",), str(path))


@pytest.mark.parametrize("authorization, requested, tenant", [
    ("Bearer sk-a", "", "team-a"), ("bearer sk-a", "team-a", "team-a"), ("Bearer  sk-a ", "", "team-a"),
    ("Bearer sk-open", "team-x", "team-x"), ("Bearer sk-legacy", "", ""), ("Bearer sk-legacy", "t", "t")])
def test_the_key_decides_the_tenant(keys, authorization, requested, tenant):
    assert keys.authorize(authorization, requested) == tenant


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer ", "sk-a", "Basic sk-a", "Bearer sk-b",
                                           "Bearer sk-a2"])
def test_missing_or_wrong_key_is_unauthenticated(keys, authorization):
    with pytest.raises(Unauthenticated, match="Authorization: Bearer <key>"):
        keys.authorize(authorization, "")


def test_another_tenant_is_permission_denied(keys):
    with pytest.raises(PermissionDenied, match="team-a"):
        keys.authorize("Bearer sk-a", "team-b")


def test_no_keys_means_no_auth():
    assert ApiKeys.load().authorize(None, "t") == "t"


@pytest.mark.parametrize("text", ["[1, 2]", "{}", "sk-a: [x]", ": nope: :"])
def test_bad_keys_file_says_what_it_expects(tmp_path, text):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match="keys file"):
        ApiKeys.load((), str(path))


def test_tls_flags_need_all_three(tmp_path, monkeypatch):
    for name in ("PDMESH_TLS_CERT", "PDMESH_TLS_KEY", "PDMESH_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    add_tls_flags(parser)
    assert tls_from_args(parser.parse_args([])) is None
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    with pytest.raises(ValueError, match="--tls-key"):
        tls_from_args(parser.parse_args(["--tls-cert", str(pem), "--tls-ca", str(pem)]))
    with pytest.raises(ValueError, match="not a readable file"):
        tls_from_args(parser.parse_args(["--tls-cert", str(pem), "--tls-key", "/nope", "--tls-ca", str(pem)]))
