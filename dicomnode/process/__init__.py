"""Harmonisation jobs: completed series off the persistent queue, through ``pipelines``,
into the archive and the outbox."""
