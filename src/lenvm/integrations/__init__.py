"""Adapters to other serving engines. Each is imported only when used: ``import lenvm`` never
imports an engine such as vLLM."""
