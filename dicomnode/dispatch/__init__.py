"""The return path: harmonised series out to peers (outbox, retries, series-state roll-up)
and storage commitment reports to the peers that asked."""
