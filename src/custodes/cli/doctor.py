"""`custodes doctor`: checks a deployment for exposure and prints each finding with its fix.

Exits 1 on any high finding, so that it can gate a deployment script; needs no keyring.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import orjson
from rich.text import Text

from custodes.cli.common import out, vault_directory
from custodes.doctor import Deployment, Severity, examine, unseal_mode, where_keks_live, worst
from custodes.web.serve import DEFAULT_PORT

_STYLE = {Severity.HIGH: "bold red", Severity.MEDIUM: "yellow", Severity.LOW: "dim"}


@click.command()
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False), help="Vault directory.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="The port the server listens on; listeners on it beyond loopback must speak TLS.",
)
@click.option("--url", help="The address officials use, e.g. https://vault.example:8443/.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="The server's certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The server's private key.")
@click.option(
    "--schema",
    "schema_path",
    type=click.Path(exists=True, dir_okay=False),
    help="The schema file this deployment expects; compared with the vault's.",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    help="A proxy the server trusts, as given to 'serve --trusted-proxy' (repeatable).",
)
@click.option(
    "--behind-tls-proxy",
    is_flag=True,
    help="The server runs with 'serve --behind-tls-proxy': TLS is the proxy's.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per finding.")
def doctor(
    vault_dir: str | None,
    port: int,
    url: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    schema_path: str | None,
    trusted_proxies: tuple[str, ...],
    behind_tls_proxy: bool,
    as_json: bool,
) -> None:
    """Check file modes, where the keys are, the database role's grants, listening
    addresses, TLS and accounts.

    Prints every finding with its severity and a fix; exits 1 if any is high.
    """
    directory = vault_directory(vault_dir)
    keks = where_keks_live(directory)
    if keks is not None and not as_json:
        out.print(Text(f"Key-encryption keys: {keks}"))
    findings = examine(
        Deployment(
            vault_dir=directory,
            port=port,
            url=url,
            tls_cert=Path(tls_cert) if tls_cert else None,
            tls_key=Path(tls_key) if tls_key else None,
            schema_path=Path(schema_path) if schema_path else None,
            trusted_proxies=trusted_proxies,
            behind_tls_proxy=behind_tls_proxy,
        )
    )
    for finding in findings:
        if as_json:
            doc = {
                "check": finding.check,
                "severity": finding.severity.value,
                "message": finding.message,
                "fix": finding.fix,
            }
            sys.stdout.write(orjson.dumps(doc).decode() + "\n")
            continue
        line = Text()
        line.append(f"{finding.severity.value.upper():<6} ", style=_STYLE[finding.severity])
        line.append(f"{finding.message}\n       fix: {finding.fix}")
        out.print(line)
    if not as_json:
        mode = unseal_mode(vault_directory(vault_dir))
        if mode is not None:
            out.print(mode)
        counts = {s: sum(f.severity is s for f in findings) for s in Severity}
        out.print(
            "no findings"
            if not findings
            else ", ".join(f"{n} {s.value}" for s, n in counts.items())
        )
    if worst(findings) is Severity.HIGH:
        sys.exit(1)
