"""Storage shards: each process owns the mailboxes of its slots in one RocksDB."""
