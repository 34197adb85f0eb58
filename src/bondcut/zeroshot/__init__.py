"""Zero-shot tasks built from the held-out Brown corpus files, scored with lm-evaluation-harness.

No packaged benchmark (HellaSwag, LAMBADA, ...) is available offline, so bondcut builds two from real text
that no calibration or healing step ever sees (the ``"heldout"`` split of :mod:`bondcut.corpus`):

* ``brown_cloze`` — multiple choice: the true next sentence of a passage among 4 length-matched options.
* ``brown_lastword`` — LAMBADA-style: the final word of a passage, a word that also appears earlier in it.

::

    from bondcut.zeroshot import zero_shot
    zero_shot(model, tokenizer, limit=100)   # {"brown_cloze": {"acc": ..., "acc_stderr": ..., "n": 100}, ...}

Importing this package does not import lm_eval; :func:`zero_shot` does, after checking its arguments.
"""

from .builders import build_cloze, build_lastword
from .run import check_limit, zero_shot
from .taskfiles import TASKS, TASKS_VERSION, check_tasks, load_items, task_dir

__all__ = [
    "TASKS",
    "TASKS_VERSION",
    "build_cloze",
    "build_lastword",
    "check_limit",
    "check_tasks",
    "load_items",
    "task_dir",
    "zero_shot",
]
