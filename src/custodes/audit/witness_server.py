"""The witness over HTTP: `POST /add-checkpoint` as C2SP tlog-witness specifies, loopback only.

Run it as its own process: `python -m custodes.audit.witness_server DIR --port N`, with
the passphrase in CUSTODES_WITNESS_PASSPHRASE; it prints its address once listening.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click

from custodes import settings
from custodes.audit.checkpoint import MalformedNote, SignatureInvalid
from custodes.audit.witness import (
    MAX_REQUEST_BYTES,
    SIZE_CONTENT_TYPE,
    Conflict,
    ForkDetected,
    InvalidProofError,
    MalformedRequest,
    RollbackRefused,
    UnknownLog,
    Witness,
    parse_request,
)
from custodes.errors import ConfigurationError, CustodesError

__all__ = ["ENV_PASSPHRASE", "check_loopback", "make_server", "serve"]

ENV_PASSPHRASE = "CUSTODES_WITNESS_PASSPHRASE"  # noqa: S105 - a variable name
_TEXT = "text/plain; charset=utf-8"


def check_loopback(host: str) -> None:
    """Refuse any address but loopback: this server speaks plain HTTP, without TLS."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(
            "the witness listens on loopback only (127.0.0.1, ::1) until it has TLS"
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], witness: Witness) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.witness = witness
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # Keep-alive, as the protocol recommends; every reply carries a Content-Length.
    protocol_version = "HTTP/1.1"
    # A client that stalls mid-request must not hold a thread forever.
    timeout = 15
    server_version = "custodes-witness"
    sys_version = ""

    def do_POST(self) -> None:
        if self.path != "/add-checkpoint":
            self._reply(404, "not found\n")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isascii() or not length.isdigit():
            self.close_connection = True
            self._reply(411 if length is None else 400, "a Content-Length is required\n")
            return
        if int(length) > MAX_REQUEST_BYTES:
            self.close_connection = True
            self._reply(413, "request too large\n")
            return
        body = self.rfile.read(int(length))
        status, text, content_type = _answer(self.server.witness, body)
        self._reply(status, text, content_type)

    def do_GET(self) -> None:
        self._reply(404, "not found\n")

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_GET

    def _reply(self, status: int, text: str, content_type: str = _TEXT) -> None:
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _answer(witness: Witness, body: bytes) -> tuple[int, str, str]:
    """Map each refusal to the status tlog-witness assigns it; messages carry no data."""
    try:
        old_size, proof, note = parse_request(body)
        lines = witness.add_checkpoint(old_size, proof, note)
    except Conflict as exc:
        return 409, f"{exc.size}\n", SIZE_CONTENT_TYPE
    except ForkDetected:
        return 409, "another root is already cosigned at this size\n", _TEXT
    except UnknownLog:
        return 404, "unknown log origin\n", _TEXT
    except (MalformedRequest, MalformedNote, RollbackRefused):
        return 400, "malformed request, or a checkpoint below the old size\n", _TEXT
    except SignatureInvalid:
        return 403, "no valid signature by a known log key\n", _TEXT
    except InvalidProofError:
        return 422, "consistency proof does not verify\n", _TEXT
    except CustodesError:
        return 500, "the witness could not process the request\n", _TEXT
    return 200, "".join(lines), _TEXT


def make_server(witness: Witness, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server bound to a loopback address (port 0 picks a free one), not yet serving."""
    check_loopback(host)
    try:
        return _Server((host, port), witness)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(
    directory: Path,
    passphrase: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ready: Callable[[str, int], None] | None = None,
) -> None:
    """Open the witness in `directory` and serve it until interrupted."""
    check_loopback(host)
    witness = Witness.open(Path(directory), passphrase=passphrase)
    server = make_server(witness, host, port)
    try:
        if ready is not None:
            ready(host, server.server_address[1])
        server.serve_forever()
    finally:
        server.server_close()


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address.")
@click.option(
    "--port", default=0, type=click.IntRange(0, 65535), help="Port (default: any free one)."
)
def main(directory: str, host: str, port: int) -> None:
    """Serve a witness directory over HTTP on a loopback address."""
    passphrase = settings.env(ENV_PASSPHRASE)
    if passphrase is None:
        raise click.UsageError(f"set {ENV_PASSPHRASE} to the witness key's passphrase")

    def announce(bound_host: str, bound_port: int) -> None:
        click.echo(f"listening on http://{bound_host}:{bound_port}/")

    try:
        serve(Path(directory), passphrase, host, port, ready=announce)
    except CustodesError as exc:
        click.echo(f"custodes-witness: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
