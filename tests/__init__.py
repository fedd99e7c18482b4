"""The test suite: ``unit/`` runs in process; ``integration/`` starts the node, Orthanc,
dcmtk or other real programs. Helpers (factories, node and Orthanc processes) live here."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout
