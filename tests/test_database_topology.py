"""Where a vault on PostgreSQL reads and writes, as vault.toml and the environment name it:
the primary, its replicas, the log's database and the lag bound; checked like the primary's
URL, never repeating a connection string in an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from custodes.cli import cli
from custodes.errors import ConfigurationError
from custodes.settings import (
    ENV_LOG_DATABASE,
    ENV_REPLICA_MAX_LAG,
    ENV_REPLICAS,
    VaultLayout,
    database_topology,
)

PRIMARY = "host=n1,n2 port=5432,5432 dbname=custodes user=app target_session_attrs=read-write"
STANDBY = "host=n1,n2 port=5432,5432 dbname=custodes user=app target_session_attrs=standby"


def written(tmp_path: Path, **topology: object) -> VaultLayout:
    layout = VaultLayout(tmp_path)
    layout.write(
        b"\x01" * 16,
        Path("/keys/k"),
        Path("/keys/l"),
        PRIMARY,
        "app",
        **topology,  # type: ignore[arg-type]
    )
    return layout


def test_replicas_log_database_and_lag_bound_are_recorded_and_read_back(tmp_path: Path) -> None:
    layout = written(
        tmp_path,
        replicas=(STANDBY, "postgresql://app@n3:5432/custodes"),
        log_database="postgresql://app@log:5432/log",
        replica_max_lag=0.25,
    )
    recorded = layout.read()
    assert recorded.replicas == (STANDBY, "postgresql://app@n3:5432/custodes")
    assert recorded.log_database == "postgresql://app@log:5432/log"
    assert recorded.replica_max_lag == 0.25
    # A vault written without them reads back without them, at the default bound.
    plain = VaultLayout(tmp_path / "plain")
    plain.directory.mkdir()
    plain.write(b"\x02" * 16, Path("/keys/k"), Path("/keys/l"), PRIMARY)
    assert plain.read().replicas == () and plain.read().log_database is None


def test_a_replica_naming_a_password_is_refused_by_its_place_never_its_text(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigurationError, match="replica 2") as refused:
        written(tmp_path, replicas=(STANDBY, "postgresql://app:hunter2-secret@n3/custodes"))
    assert "hunter2" not in str(refused.value)
    assert not (tmp_path / "vault.toml").exists()


def test_a_vault_toml_edited_to_a_bad_replica_list_is_refused_by_its_place(tmp_path: Path) -> None:
    layout = written(tmp_path, replicas=(STANDBY,))
    text = layout.vault_file.read_text().replace("replicas = [", "replicas = [42, ")
    layout.vault_file.write_text(text)
    with pytest.raises(ConfigurationError, match="replica 1 is not"):
        layout.read()


def test_the_environment_names_other_replicas_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = written(tmp_path, replicas=(STANDBY,)).read()
    topology = database_topology(recorded, PRIMARY)
    assert topology is not None and topology.replicas == (STANDBY,)
    monkeypatch.setenv(ENV_REPLICAS, "postgresql://app@r1/custodes; postgresql://app@r2/custodes")
    monkeypatch.setenv(ENV_REPLICA_MAX_LAG, "0.5")
    monkeypatch.setenv(ENV_LOG_DATABASE, "postgresql://app@log/log")
    topology = database_topology(recorded, PRIMARY)
    assert topology is not None
    assert topology.replicas == ("postgresql://app@r1/custodes", "postgresql://app@r2/custodes")
    assert topology.replica_max_lag == 0.5
    assert topology.log_database == "postgresql://app@log/log"
    monkeypatch.setenv(ENV_REPLICAS, "none")
    topology = database_topology(recorded, PRIMARY)
    assert topology is not None and topology.replicas == ()
    monkeypatch.setenv(ENV_REPLICA_MAX_LAG, "nan")
    with pytest.raises(ConfigurationError, match="between"):
        database_topology(recorded, PRIMARY)
    # A vault in SQLite has no topology, whatever the environment says.
    assert database_topology(recorded, None) is None


def test_init_refuses_replicas_without_a_database(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["init", str(tmp_path / "vault"), "--replica", STANDBY],
        env={"CUSTODES_KEYRING_PASSPHRASE": "never asked for: refused before"},
    )
    assert result.exit_code != 0
    assert "--replica and --log-database go with --database" in result.output
    assert not (tmp_path / "vault").exists()
