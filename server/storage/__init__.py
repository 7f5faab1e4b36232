"""Where jobs survive a restart: the store interface, the journal and snapshots."""
