"""chat settings: mood and folder

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("chat", sa.Column("mood", sa.String(length=16), nullable=True))
    op.add_column("chat", sa.Column("folder", sa.String(length=100), nullable=True))
    # Deleted chats are found by age for purging.
    op.create_index(
        "ix_chat_deleted_at",
        "chat",
        ["deleted_at"],
        postgresql_where=sa.text("deleted_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_chat_deleted_at", table_name="chat")
    op.drop_column("chat", "folder")
    op.drop_column("chat", "mood")
