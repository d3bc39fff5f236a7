"""Sealing values written before owui-crypto was installed.

Revision ID: 0006
Revises: 0005
"""

from app_adapter.migrate import apply_sql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("70_seal_existing.sql")


def downgrade() -> None:
    apply_sql("down/70_seal_existing.sql")
