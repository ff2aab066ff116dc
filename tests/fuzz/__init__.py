"""Loader fuzzing (issue 14): the shared seeds, mutators and targets, and the on-demand campaign."""
