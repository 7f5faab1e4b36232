"""The embedded store: the in-memory tables with a journal and snapshots in a data directory
(checksummed frames, fsync policies, recovery). The default for one machine."""

from server.storage.embedded.repository import EmbeddedRepository

__all__ = ["EmbeddedRepository"]
