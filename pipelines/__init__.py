"""Experiment specs, the spec -> KFP pipeline builder, and the ``lmcompose`` command line."""
