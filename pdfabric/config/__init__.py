"""Topology configuration (YAML -> pydantic v2 models)."""
