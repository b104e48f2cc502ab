"""`python -m tlkit ...` (and `torchrun -m tlkit pretrain ...`)."""

from tlkit.cli import main

main()
