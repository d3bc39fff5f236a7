"""Key ring, transport keys and activate().

Revision ID: 0002
Revises: 0001
"""

from app_adapter.migrate import apply_sql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("20_keys.sql")


def downgrade() -> None:
    apply_sql("down/20_keys.sql")
