"""`--quiet` for every command at once: no progress bars, the engine's nor a library's.

The engine's own bars follow `progress=not quiet`; the libraries' do not (transformers' "Writing
model shards" bar showed under `organism --quiet` in `make demo`), so `--quiet` also switches
off the bars of transformers and huggingface_hub, and, through TQDM_DISABLE, of every other
tqdm user imported after it (lm-eval, datasets)."""
from __future__ import annotations

import contextlib
import os
import sys

_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextlib.contextmanager
def quiet_progress(quiet: bool):
    """While the command runs, no progress bars if `quiet`; afterwards everything as it was
    (a test or a notebook calls main() in a process that goes on)."""
    if not quiet:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)  # read at import by tqdm and huggingface_hub: libraries not yet loaded
    restore = []
    # libraries already loaded read no environment again: switch theirs off directly
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            restore.append(hf_logging.enable_progress_bar)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
    try:
        yield
    finally:
        for undo in restore:
            undo()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
