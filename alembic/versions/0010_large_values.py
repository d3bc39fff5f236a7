"""Large values: the envelope check no longer fails on values over about 100 MB.

Revision ID: 0010
Revises: 0009
"""

from app_adapter.migrate import apply_sql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("96_large_values.sql")


def downgrade() -> None:
    apply_sql("down/96_large_values.sql")
