"""The PostgreSQL job repository: one shared queue for several handler replicas
(docs/adr/0002-postgres-replicas.md)."""

from server.storage.postgres.repository import PostgresRepository

__all__ = ["PostgresRepository"]
