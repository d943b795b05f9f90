"""The agent-state layout, synthetic data, and loading a user's data files.

Layout of one agent state (D = 10 features):

    index 0, 1  x, y        position, normalised to [0, 1]
    index 2     health      [0, 1] (x100 = hit points)
    index 3     has_target  0 or 1
    index 4     energy      [0, 1]
    index 5-9   role        one-hot over 5 roles
"""

from __future__ import annotations

N_FEATURES = 10
N_ROLES = 5
FEATURE_NAMES: tuple[str, ...] = (
    "x",
    "y",
    "health",
    "has_target",
    "energy",
    "role_0",
    "role_1",
    "role_2",
    "role_3",
    "role_4",
)
POSITION = slice(0, 2)
HEALTH = 2
HAS_TARGET = 3
ENERGY = 4
ROLE = slice(5, 10)

ALIVE_THRESHOLD = 0.1  # is_alive := health > 0.1
THREAT_HEALTH = 0.3  # threatened := has_target and health < 0.3

# Semantic features derived from the layout, in reporting order.
SEMANTIC_FEATURES: tuple[str, ...] = (
    "position",
    "health",
    "has_target",
    "energy",
    "is_alive",
    "role",
    "threatened",
)
