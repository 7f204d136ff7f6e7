"""tailmon.monitor."""
