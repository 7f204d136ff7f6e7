"""tailmon.estimators."""
