"""The default tolerance-mode thresholds of an inference record (SPEC.md 8.8): those of its dtype
and the replay's, widened for the record's layer-block depth only as far as the client accepts.

    tolerance, note = default_tolerance(record, "float64", accepted_layers_per_block=2)
"""

from __future__ import annotations

from ..errors import InputError
from ..verdict.comparison import Tolerance
from .record import InferenceRecord

ACCEPTED_LAYERS_PER_BLOCK = 2  # the deepest layer block the default thresholds widen for, unless the client says more


def default_tolerance(record: InferenceRecord, replay_dtype: str | None = None,
                      accepted_layers_per_block: int = ACCEPTED_LAYERS_PER_BLOCK) -> tuple[Tolerance, str | None]:
    """The default thresholds for `record` replayed in `replay_dtype` (SPEC.md 8.8), and a note
    when they were not widened as far as the record's layer blocks ask. The depth factor widens
    thresholds, and the record's layers_per_block is the provider's choice: it counts only up to
    what the client accepts (`accepted_layers_per_block`, the CLI's --max-layers-per-block)."""
    if not isinstance(accepted_layers_per_block, int) or isinstance(accepted_layers_per_block, bool) \
            or accepted_layers_per_block < 1:
        raise InputError(f"--max-layers-per-block must be an integer >= 1, got {accepted_layers_per_block!r}")
    known = replay_dtype if replay_dtype in ("bfloat16", "float16", "float32", "float64") else None
    depth = min(record.settings.layers_per_block, accepted_layers_per_block)
    note = None
    if record.settings.layers_per_block > accepted_layers_per_block:
        note = (f"the default thresholds were widened for layer blocks of at most {accepted_layers_per_block} layers, "
                f"not the record's {record.settings.layers_per_block} (the provider chose that depth): an honest "
                f"record may exceed them; give --max-layers-per-block {record.settings.layers_per_block} if you "
                "accept blocks that deep")
    return Tolerance.for_dtype(record.model["dtype"], known, depth), note
