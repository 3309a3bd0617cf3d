"""tools: a chat's web and toolkit settings, each turn's tool set, and tool calls waiting for a person's decision

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "chat", sa.Column("toolkit_ids", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )
    op.add_column(
        "chat", sa.Column("web", sa.Boolean(), server_default=sa.text("false"), nullable=False)
    )
    op.add_column(
        "turn", sa.Column("tools", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )
    op.create_table(
        "tool_approval",
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("chat_id", sa.String(length=64), nullable=False),
        sa.Column("turn_id", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("tool_call_id", sa.String(length=200), nullable=False),
        sa.Column("tool_name", sa.String(length=200), nullable=False),
        sa.Column("input", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organization.id"],
            name=op.f("fk_tool_approval_organization_id_organization"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("organization_id", "id", name=op.f("pk_tool_approval")),
    )
    op.create_index(
        op.f("ix_tool_approval_organization_id_chat_id_status"),
        "tool_approval",
        ["organization_id", "chat_id", "status"],
    )


def downgrade() -> None:
    op.drop_table("tool_approval")
    op.drop_column("turn", "tools")
    op.drop_column("chat", "web")
    op.drop_column("chat", "toolkit_ids")
