"""Library calls print nothing: transformers' and the hub's progress bars, logging and Python
warnings are silenced for the duration of a workflow call, then restored.

    with quiet():
        report = verifier.verify("runs/demo")

The CLI draws its own progress bars; a pipeline calling the Python API gets a `Report` and no
output on stdout or stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# loggers of the libraries aftune drives, which log warnings (and tqdm bars) on ordinary calls
_LOGGERS = ("transformers", "huggingface_hub", "peft", "accelerate", "torch", "safetensors")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence third-party logging, progress bars and warnings inside the block; restore after."""
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                                                  "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
                      TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    levels = {}
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.ERROR)
    bars = _transformers_bars(False)  # (None only when transformers is absent)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _transformers_bars(bars)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _transformers_bars(enabled: bool | None) -> bool | None:
    """Turn transformers' tqdm bars on or off; returns what they were (None: transformers is not
    installed, or nothing to restore)."""
    if enabled is None:
        return None
    try:
        import transformers.utils.logging as module
    except ImportError:
        return None
    was = module.is_progress_bar_enabled()
    (module.enable_progress_bar if enabled else module.disable_progress_bar)()
    return was
