"""lightning-caopd: on-policy distillation (OPD) and calibration-aware OPD (CaOPD).

CaOPD follows arXiv 2604.16830, "The Illusion of Certainty: Decoupling Capability and
Calibration in On-Policy Distillation".
"""

__version__ = "0.1.0"

from lightning_caopd.resolvers import register as _register_resolvers

_register_resolvers()

from lightning_caopd.config import compose  # noqa: E402  (after the resolvers)

__all__ = ["compose"]
