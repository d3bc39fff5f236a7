"""Schemas owui_crypto and owui_crypto_view, pgcrypto, Fernet.

Revision ID: 0001
Revises: None
"""

from app_adapter.migrate import apply_sql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("00_foundation.sql", "10_fernet.sql")


def downgrade() -> None:
    apply_sql("down/00_foundation.sql")
