"""datasets' DVC md5 (another host pulls them by it) and the node that built each artifact

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('dataset') as batch:
        batch.add_column(
            sa.Column('dvc_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False,
                      server_default='')
        )
    with op.batch_alter_table('artifact') as batch:
        batch.add_column(
            sa.Column('built_on', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False,
                      server_default='')
        )


def downgrade() -> None:
    with op.batch_alter_table('artifact') as batch:
        batch.drop_column('built_on')
    with op.batch_alter_table('dataset') as batch:
        batch.drop_column('dvc_hash')
