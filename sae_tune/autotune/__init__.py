"""Autotuning: workloads, timing, search and verification of decode candidates."""
