"""Hydra configs, shipped inside the package so that installed entry points find them."""
