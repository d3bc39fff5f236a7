"""The memo's key columns on "user" and crypto-shredding.

Revision ID: 0005
Revises: 0004
"""

from app_adapter.migrate import apply_sql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("60_user_columns.sql")


def downgrade() -> None:
    apply_sql("down/60_user_columns.sql")
