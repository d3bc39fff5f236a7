"""A cheaper activate(): same protocol and checks, helpers inlined, one exception block.

Revision ID: 0011
Revises: 0010
"""

from app_adapter.migrate import apply_sql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("97_fast_activate.sql")


def downgrade() -> None:
    apply_sql("down/97_fast_activate.sql")
