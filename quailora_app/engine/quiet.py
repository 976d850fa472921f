"""Keep library chatter out of the user's terminal and UI: progress goes through our event stream."""
from __future__ import annotations

import logging
import os
import warnings

from huggingface_hub.utils import disable_progress_bars
from transformers.utils import logging as hf_logging


def quiet_libraries() -> None:
    """bitsandbytes logs a warning per 8-bit matmul on CPU and a hub-kernel miss at import; transformers and
    peft warn about deprecations the user cannot act on. Errors still come through."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
