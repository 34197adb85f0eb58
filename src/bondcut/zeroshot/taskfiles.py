"""The zero-shot tasks on disk: JSONL items plus lm-eval task YAML, written once into bondcut's cache.

``task_dir()`` is ``cache_dir()/zeroshot/v<TASKS_VERSION>``: for each task ``<name>.jsonl`` (the items of
:mod:`bondcut.zeroshot.builders`) and ``<name>.yaml`` (the packaged template in ``templates/`` with the
JSONL's absolute path filled in, since lm-eval resolves relative ``data_files`` against the working
directory). The folder is written atomically and rebuilt if a file is missing. Any lm-eval run can use it:
``lm_eval --include_path $(python -c 'from bondcut.zeroshot import task_dir; print(task_dir())') ...``.
Bump :data:`TASKS_VERSION` whenever a builder or template changes, so old caches are not reused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

import yaml

from ..cache import atomic_directory, cache_dir
from .builders import build_cloze, build_lastword
from .sentences import split_runs, split_sentence_texts

TASKS_VERSION = 1
BUILDERS: dict[str, Callable[..., list[dict]]] = {"brown_cloze": build_cloze, "brown_lastword": build_lastword}
TASKS = tuple(BUILDERS)
_DATA_FILE_LINE = re.compile(r"^(\s+test:) null\s*$", flags=re.MULTILINE)


def check_tasks(tasks: Iterable[str] | str) -> tuple[str, ...]:
    """``tasks`` as a tuple of known task names; a ValueError naming the available ones otherwise."""
    names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [name for name in names if name not in BUILDERS]
    if unknown or not names:
        raise ValueError(
            f"unknown zero-shot task(s) {unknown or names!r}; available tasks: {', '.join(TASKS)}; "
            f"e.g. zero_shot(model, tokenizer, tasks=('brown_cloze',)) or `bondcut eval MODEL --tasks all`"
        )
    return names


def task_yaml(name: str, data_file: Path) -> str:
    """The packaged YAML template of task ``name`` with ``data_files.test`` set to ``data_file`` (absolute)."""
    template = (resources.files(__package__) / "templates" / f"{name}.yaml").read_text(encoding="utf-8")
    text, count = _DATA_FILE_LINE.subn(lambda match: f"{match.group(1)} {json.dumps(str(data_file))}", template)
    config = yaml.safe_load(text)
    if count != 1 or config["dataset_kwargs"]["data_files"]["test"] != str(data_file):
        raise RuntimeError(f"templates/{name}.yaml must hold exactly one 'test: null' line under data_files")
    return text


def write_tasks(target: Path) -> None:
    """Build every task from the held-out split and write its JSONL and YAML into ``target`` atomically.

    Held-out sentences that also occur verbatim in the train or calibration files are never options or
    last sentences (a few short ones such as "He shook his head." do).
    """
    files = split_runs("heldout")
    exclude = split_sentence_texts("train", "calibration")
    with atomic_directory(target, overwrite=True) as tmp:
        for name, build in BUILDERS.items():
            items = build(files, exclude=exclude)
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
            (tmp / f"{name}.yaml").write_text(task_yaml(name, target / f"{name}.jsonl"), encoding="utf-8")


def task_dir() -> Path:
    """The folder of task files for lm-eval's ``TaskManager(include_path=...)``, written on first use."""
    target = cache_dir() / "zeroshot" / f"v{TASKS_VERSION}"
    if not all((target / f"{name}.{ext}").exists() for name in TASKS for ext in ("jsonl", "yaml")):
        write_tasks(target)
    return target


def load_items(name: str) -> list[dict]:
    """The items of task ``name`` as written to its JSONL, in the order lm-eval reads them."""
    (name,) = check_tasks((name,))
    lines = (task_dir() / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]
