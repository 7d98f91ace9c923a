"""Give items.processed a server default, so inserts from outside the ORM need not set it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.alter_column("processed", existing_type=sa.Boolean(), server_default=sa.false())


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.alter_column("processed", existing_type=sa.Boolean(), server_default=None)
