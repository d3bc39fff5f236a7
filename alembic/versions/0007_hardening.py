"""Hardening: pinned search paths, strict envelopes, verified owners, a transport no client can steer or replay.

Revision ID: 0007
Revises: 0006
"""

from app_adapter.migrate import apply_sql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("80_hardening.sql")


def downgrade() -> None:
    apply_sql("down/80_hardening.sql")
