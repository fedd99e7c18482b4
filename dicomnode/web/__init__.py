"""The node over HTTP (``[web]``): a server-rendered console, Prometheus ``/metrics``,
``/healthz`` and ``/readyz`` probes, and DICOMweb (QIDO-RS, WADO-RS, STOW-RS) under
``/dicomweb``, served by uvicorn in a thread of the running node (:mod:`.server`).

Pages and services read the node's index and call the same code the commands do
(``dispatch.outbox.resend_series``, ``Index.reprocess``, ``store.ingest.receive_file``,
``store.lookup``); nothing here keeps state of its own but the audit log.
"""
