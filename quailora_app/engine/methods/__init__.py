"""Initialization methods: the per-layer math (init_math), the one registry (registry), and the
whole-model methods (budget, distill, sequential) the registry names by path and imports when one is run."""
