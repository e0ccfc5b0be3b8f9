"""``tokenweir ledger migrate-to-postgres``: move a SQLite ledger file into PostgreSQL.

The shell around :func:`serving.metering.migrate_to_postgres`: the file is migrated to the current
schema, copied into an empty database in one transaction, verified (row counts, the audit on both
sides) before that commits, and the result printed as JSON. Stop the gateway first: the copy holds
the file's writer lock and the database's, and is refused while a ledger holds either.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["ledger_app"]

ledger_app = typer.Typer(
    help="The ledger's store: move a SQLite ledger into PostgreSQL.", no_args_is_help=True
)


@ledger_app.command("migrate-to-postgres")
def migrate_to_postgres(
    from_path: Annotated[
        Path, typer.Option("--from", help="The SQLite ledger file (migrated to the current schema first).")
    ],
    dsn: Annotated[
        str,
        typer.Option(
            envvar="TOKENWEIR_LEDGER_DSN",
            help="libpq connection string or URI of the empty target database (default:"
            " $TOKENWEIR_LEDGER_DSN, which keeps a password out of the process list).",
        ),
    ],
) -> None:
    """Copy a SQLite ledger into an empty PostgreSQL database in one verified transaction; prints
    the rows copied per table. Exit 1 when refused (target not empty, a ledger running, audit or
    verification failed; nothing written), 2 when the file does not exist."""
    import psycopg

    from serving.metering import LedgerLockedError, MigrationRefusedError, migrate_to_postgres

    if not from_path.is_file():
        print(f"tokenweir: no ledger file at {from_path}", file=sys.stderr)
        raise typer.Exit(2)
    try:
        report = migrate_to_postgres(from_path, dsn)
    except (MigrationRefusedError, LedgerLockedError, psycopg.Error) as e:
        print(f"tokenweir: migration refused, nothing written: {e}", file=sys.stderr)
        raise typer.Exit(1) from e
    print(json.dumps({"migrated": str(from_path), **dataclasses.asdict(report)}, indent=2))
    print(
        f"tokenweir: copied {sum(report.rows.values())} rows; set metering.store: postgres to use it",
        file=sys.stderr,
    )
