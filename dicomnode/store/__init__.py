"""Storage: durable files, ingesting one instance, the SQLite index and everything that
queries it, query matching, the archive's retention, and start-up recovery."""
