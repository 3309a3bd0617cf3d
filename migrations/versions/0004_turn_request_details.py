"""turn request details: idempotency fingerprint, estimated usage, a queued turn's user message

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 16:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("turn", sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
    op.add_column(
        "turn",
        sa.Column("usage_estimated", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column(
        "turn",
        sa.Column("queued_user_parts", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("turn", "queued_user_parts")
    op.drop_column("turn", "usage_estimated")
    op.drop_column("turn", "request_fingerprint")
