"""Coverage: every place Open WebUI keeps a user's words is sealed or plaintext by a stated decision.

Revision ID: 0008
Revises: 0007
"""

from app_adapter.migrate import apply_sql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("90_coverage.sql")


def downgrade() -> None:
    apply_sql("down/90_coverage.sql")
