"""``python -m sparsecircuits.cli`` (e.g. under ``torchrun``)."""

from sparsecircuits.cli import main

main()
