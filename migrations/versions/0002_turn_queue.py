"""turn queue: the order in which a busy chat's queued turns run

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("turn", sa.Column("queue_position", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_turn_queued_by_chat",
        "turn",
        ["organization_id", "chat_id", "queue_position"],
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_turn_queued_by_chat", table_name="turn")
    op.drop_column("turn", "queue_position")
