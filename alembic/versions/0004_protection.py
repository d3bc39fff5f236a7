"""Protection policy and the generator of views and triggers.

Revision ID: 0004
Revises: 0003
"""

from app_adapter.migrate import apply_sql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("40_policy.sql", "50_generate.sql")


def downgrade() -> None:
    apply_sql("down/50_generate.sql", "down/40_policy.sql")
