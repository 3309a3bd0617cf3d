"""models, usage and budgets: default models, turn cost and usage detail, budgets, the usage ledger

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

USD = sa.Numeric(precision=20, scale=10)


def upgrade() -> None:
    op.add_column("organization", sa.Column("default_model", sa.String(length=200), nullable=True))
    for column in ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens"):
        op.add_column("turn", sa.Column(column, sa.Integer(), nullable=True))
    op.add_column("turn", sa.Column("cost_usd", USD, nullable=True))
    op.add_column(
        "turn", sa.Column("model_choice", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )
    op.add_column(
        "turn", sa.Column("attempt_log", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )
    op.add_column("turn", sa.Column("messages_left_out", sa.Integer(), nullable=True))

    op.create_table(
        "user_preference",
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("default_model", sa.String(length=200), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organization.id"],
            name=op.f("fk_user_preference_organization_id_organization"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("organization_id", "user_id", name=op.f("pk_user_preference")),
    )
    op.create_table(
        "budget",
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("weekly_usd", USD, nullable=True),
        sa.Column("per_chat_usd", USD, nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organization.id"],
            name=op.f("fk_budget_organization_id_organization"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("organization_id", "user_id", name=op.f("pk_budget")),
    )
    op.create_table(
        "usage_ledger",
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("turn_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=True),
        sa.Column("chat_id", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reserved_usd", USD, nullable=False),
        sa.Column("cost_usd", USD, nullable=True),
        *(
            sa.Column(column, sa.Integer(), server_default=sa.text("0"), nullable=False)
            for column in (
                "input_tokens",
                "cached_input_tokens",
                "cache_write_tokens",
                "output_tokens",
                "reasoning_tokens",
            )
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organization.id"],
            name=op.f("fk_usage_ledger_organization_id_organization"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("organization_id", "turn_id", name=op.f("pk_usage_ledger")),
    )
    op.create_index(
        op.f("ix_usage_ledger_organization_id_created_at"),
        "usage_ledger",
        ["organization_id", "created_at"],
    )
    op.create_index(
        op.f("ix_usage_ledger_organization_id_user_id_created_at"),
        "usage_ledger",
        ["organization_id", "user_id", "created_at"],
    )
    op.create_index(
        op.f("ix_usage_ledger_organization_id_chat_id"),
        "usage_ledger",
        ["organization_id", "chat_id"],
    )


def downgrade() -> None:
    op.drop_table("usage_ledger")
    op.drop_table("budget")
    op.drop_table("user_preference")
    for column in (
        "messages_left_out",
        "attempt_log",
        "model_choice",
        "cost_usd",
        "reasoning_tokens",
        "cache_write_tokens",
        "cached_input_tokens",
    ):
        op.drop_column("turn", column)
    op.drop_column("organization", "default_model")
