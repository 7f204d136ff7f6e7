"""tailmon.proposals."""
