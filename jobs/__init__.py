"""Cluster side and entry point: the `stylegen` CLI, Ray Jobs submission, reports."""
