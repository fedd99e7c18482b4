"""Talking DICOM: the node's AE, associations with peers, who may associate, transfer
syntaxes, status codes, and the few pynetdicom internals the node relies on."""
