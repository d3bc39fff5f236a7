"""Alembic environment: owui-crypto's migrations, in their own version table."""

from sqlalchemy import create_engine, pool

from alembic import context
from app_adapter.migrate import VERSION_TABLE, database_url, refresh

config = context.config
url = config.attributes.get("database_url") or database_url()


def run_migrations_online() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, version_table=VERSION_TABLE, transaction_per_migration=False)
        with context.begin_transaction():
            context.run_migrations()
            # Every run ends with views and triggers matching the live tables,
            # even when no migration was pending (Open WebUI may have added columns).
            refresh(connection)


if context.is_offline_mode():
    raise SystemExit("owui-crypto migrations run online only: they read the live Open WebUI schema.")
run_migrations_online()
