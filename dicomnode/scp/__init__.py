"""The node as a service class provider: one module per DIMSE service, ``association``
for who may associate, and ``events`` binding every handler to its pynetdicom event."""
