"""Bundled examples that the embedded default config serves."""
