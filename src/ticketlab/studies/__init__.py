"""Experiments, one module each; a study never imports another study."""
