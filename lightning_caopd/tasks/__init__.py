"""The domains: the toy world, science multiple choice and tool use (items, verifiers)."""
