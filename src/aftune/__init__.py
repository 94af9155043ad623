"""aftune: auditable fine-tuning and inference.

A provider records every (layer block x step block) of a fine-tuning run, commits to it with
digests and Merkle roots, and signs each step block's root as it ends. A client later challenges
blocks and a verifier replays them. See SPEC.md for every byte that is hashed, signed or stored.
"""

__version__ = "0.1.0"

from . import _moved

_moved.install()
