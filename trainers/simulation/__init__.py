"""Virtual CT and MR scanners (placeholder docstring)."""

from trainers.simulation.domains import DOMAINS, CTDomain, Domain, MRDomain, key_tags
from trainers.simulation.series import (
    geometry,
    ground_truth,
    make_phantom,
    simulate_series,
)

__all__ = ["DOMAINS", "CTDomain", "Domain", "MRDomain", "geometry", "ground_truth", "key_tags",
           "make_phantom", "simulate_series"]
