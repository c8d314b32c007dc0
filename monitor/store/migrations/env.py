"""Alembic environment: run by `monitor.store.db.migrate` on a connection it hands over."""

from alembic import context

from monitor.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
