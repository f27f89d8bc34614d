"""Stage 0, what the user says: board recipes, fleet inventories and the facts per CPU family.

Everything here is data loaded and validated once into frozen dataclasses; nothing runs a tool.
"""
