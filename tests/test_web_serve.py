"""Threats 1 and 2 at the server: loopback by default, no listening elsewhere without TLS,
no switch that turns authentication off, self-signed keys kept apart from the vault."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from custodes.errors import ConfigurationError
from custodes.web import serve
from tests.test_cli import run, vault_env  # noqa: F401 - a fixture, used by name


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "vault.example.org"])
def test_public_address_without_tls_is_refused(host: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        serve.check_bind(host, None)
    message = str(refused.value)
    assert "without TLS" in message and "--tls-cert" in message and "127.0.0.1" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_tls(host: str) -> None:
    serve.check_bind(host, None)


def test_default_bind_is_loopback() -> None:
    assert serve.DEFAULT_HOST == "127.0.0.1"


def test_serve_command_refuses_public_address_before_asking_anything(
    vault_env: dict[str, str],  # noqa: F811
) -> None:
    done = run("serve", "--host", "0.0.0.0", env=vault_env)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without TLS" in done.stderr
    assert done.stdout == ""


def test_no_option_turns_authentication_off() -> None:
    done = run("serve", "--help")
    assert done.returncode == 0
    words = done.stdout.lower()
    for switch in ("no-auth", "insecure", "anonymous", "disable-auth", "public", "open"):
        assert switch not in words


def test_self_signed_certificate_names_the_host_and_prints_a_fingerprint(tmp_path: Path) -> None:
    files = serve.self_signed("192.0.2.10", tmp_path / "tls", vault_dir=tmp_path / "vault")
    assert files.key.stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    fingerprint = serve.fingerprint(files.cert.read_bytes())
    assert len(fingerprint.split(":")) == 32
    serve.check_bind("192.0.2.10", files)


def test_self_signed_key_is_never_written_inside_the_vault(tmp_path: Path) -> None:
    (tmp_path / "vault").mkdir()
    with pytest.raises(ConfigurationError):
        serve.self_signed("localhost", tmp_path / "vault" / "tls", vault_dir=tmp_path / "vault")
    assert not (tmp_path / "vault" / "tls").exists()


def test_a_printed_fingerprint_reaches_the_operator_exactly_as_the_browser_shows_it() -> None:
    # Colon-separated hex pairs spell emoji codes (":cd:", ":ab:", ":id:"); the operator
    # compares the printed fingerprint with the browser's, so it must print verbatim.
    from custodes.cli import common

    fingerprint = "AB:CD:" + ":".join(["ID", "CL", "0F"] * 10)
    with common.out.capture() as captured:
        common.out.print(f"SHA-256 fingerprint: {fingerprint}")
    assert captured.get().strip() == f"SHA-256 fingerprint: {fingerprint}"


# -- who the client is, behind a proxy ----------------------------------------------------


def _client_seen(peer: str, forwarded: list[str], trusted: list[str]) -> str | None:
    """The client address the security middleware records for one request."""
    import asyncio

    from custodes.web.security import SecurityHeaders, trusted_networks

    seen: list[str | None] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(scope["state"]["client"])  # type: ignore[index]

    middleware = SecurityHeaders(app, trusted_proxies=trusted_networks(trusted))  # type: ignore[arg-type]
    scope = {
        "type": "http",
        "client": (peer, 40000),
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }
    asyncio.run(middleware(scope, None, None))  # type: ignore[arg-type]
    return seen[0]


def test_officials_behind_a_trusted_proxy_are_throttled_by_their_own_addresses() -> None:
    # Behind the TLS proxy doctor recommends, every official would share the proxy's
    # address, and one guesser could keep every login refused. Named as trusted, the
    # proxy's forwarded header gives each official their own.
    proxy = ["10.0.0.5"]
    assert _client_seen("10.0.0.5", ["203.0.113.7"], proxy) == "203.0.113.7"
    assert _client_seen("10.0.0.5", ["203.0.113.8"], proxy) == "203.0.113.8"
    # Two proxies in a row, both trusted: the address the outer one saw.
    assert _client_seen("10.0.0.5", ["203.0.113.9, 10.0.1.2"], ["10.0.0.0/16"]) == "203.0.113.9"


def test_a_forwarded_header_is_no_one_elses_word() -> None:
    # From an untrusted peer, or to the left of the last untrusted hop, the header is
    # the client's own words: a guesser cannot pick a fresh address for every try.
    assert _client_seen("198.51.100.4", ["203.0.113.7"], ["10.0.0.5"]) == "198.51.100.4"
    assert _client_seen("198.51.100.4", ["203.0.113.7"], []) == "198.51.100.4"
    spoofed = "192.0.2.1, 198.51.100.66"  # the client wrote the first, the proxy the second
    assert _client_seen("10.0.0.5", [spoofed], ["10.0.0.5"]) == "198.51.100.66"
    assert _client_seen("10.0.0.5", ["not-an-address"], ["10.0.0.5"]) == "10.0.0.5"


def test_serve_refuses_a_trusted_proxy_that_is_not_an_address(
    vault_env: dict[str, str],  # noqa: F811 - the fixture
) -> None:
    done = run("serve", "--trusted-proxy", "proxy.example", env=vault_env)
    assert done.returncode == 2 and "--trusted-proxy" in done.stderr


# -- whether the client spoke https, behind a proxy -------------------------------------


def test_only_a_trusted_proxys_forwarded_proto_counts() -> None:
    from custodes.web.security import forwarded_https, trusted_networks

    proxy = trusted_networks(["127.0.0.1"])
    assert forwarded_https("127.0.0.1", ["https"], proxy)
    assert not forwarded_https("127.0.0.1", ["http"], proxy)
    assert not forwarded_https("127.0.0.1", [], proxy)
    # A client's own header, passed on by a proxy that appends: the proxy's word is last.
    assert not forwarded_https("127.0.0.1", ["https, http"], proxy)
    assert forwarded_https("127.0.0.1", ["http", "HTTPS"], proxy)
    # Anyone else saying https is the client's own words.
    assert not forwarded_https("198.51.100.4", ["https"], proxy)
    assert not forwarded_https("198.51.100.4", ["https"], ())
    assert not forwarded_https(None, ["https"], proxy)


def test_behind_a_tls_proxy_the_proxy_must_be_named() -> None:
    with pytest.raises(ConfigurationError) as refused:
        serve.check_proxy_mode((), behind_tls_proxy=True)
    assert "--trusted-proxy" in str(refused.value)
    serve.check_proxy_mode(("127.0.0.1",), behind_tls_proxy=True)
    serve.check_proxy_mode((), behind_tls_proxy=False)


def test_serve_behind_a_tls_proxy_without_a_trusted_proxy_is_refused_before_anything(
    vault_env: dict[str, str],  # noqa: F811 - the fixture
) -> None:
    done = run("serve", "--behind-tls-proxy", env=vault_env)
    assert done.returncode == 2 and "--trusted-proxy" in done.stderr
    assert done.stdout == ""
