"""The incident store: alert and incident events in a database, written by `monitor incidents ingest`.

SQLAlchemy 2 with Alembic migrations: SQLite by default (embedded, nothing to install), PostgreSQL
for production (its URL from the environment or a secret file, never from the config file).
Needs the `[store]` extra.
"""
