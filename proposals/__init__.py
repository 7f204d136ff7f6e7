"""tailmon.proposals: unsafe variants of the target and the mixtures they form.

Building proposals lives in submodules imported on use (they need torch or a model):
`tailmon.proposals.lora` (LoRA training from data and by the cross-entropy method) and
`tailmon.proposals.tuning` (hyperparameters on a pilot batch). `default_proposals` gives the
system-prompt library's specs for a monitor that names no proposal.
"""

from .base import Component, Proposal, build_mixture
from .library import default_proposals, load_library
from .spec import PROPOSALS, parse_layers, parse_proposal
from .variants import (LoraProposal, ReturnProposal, SteeringProposal, SystemPromptProposal, TemperatureProposal,
                       TiltProposal)

__all__ = [
    "Component",
    "LoraProposal",
    "PROPOSALS",
    "Proposal",
    "ReturnProposal",
    "SteeringProposal",
    "SystemPromptProposal",
    "TemperatureProposal",
    "TiltProposal",
    "build_mixture",
    "default_proposals",
    "load_library",
    "parse_layers",
    "parse_proposal",
]
