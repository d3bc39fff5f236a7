"""Rekeying a user: replacing their key registration inside the resealing transaction.

Revision ID: 0009
Revises: 0008
"""

from app_adapter.migrate import apply_sql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("95_rekey.sql")


def downgrade() -> None:
    apply_sql("down/95_rekey.sql")
