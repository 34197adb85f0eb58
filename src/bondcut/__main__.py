"""``python -m bondcut`` (and ``torchrun --nproc_per_node N -m bondcut heal ...``) runs the CLI."""

from .cli import main

main()
