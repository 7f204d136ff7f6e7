"""tailmon.judges."""
