"""tailmon.proposals: unsafe variants of the target and the mixtures they form."""

from .base import Component, Proposal, build_mixture
from .spec import PROPOSALS, parse_layers, parse_proposal
from .variants import LoraProposal, SteeringProposal, SystemPromptProposal, TemperatureProposal

__all__ = [
    "Component",
    "LoraProposal",
    "PROPOSALS",
    "Proposal",
    "SteeringProposal",
    "SystemPromptProposal",
    "TemperatureProposal",
    "build_mixture",
    "parse_layers",
    "parse_proposal",
]
