"""tailmon.engines."""
