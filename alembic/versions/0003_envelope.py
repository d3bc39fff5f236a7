"""The sealed-value envelope: seal and open.

Revision ID: 0003
Revises: 0002
"""

from app_adapter.migrate import apply_sql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("30_seal.sql")


def downgrade() -> None:
    apply_sql("down/30_seal.sql")
