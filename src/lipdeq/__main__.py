"""``python -m lipdeq`` (also what ``torchrun -m lipdeq train ...`` runs)."""

from lipdeq.cli import main

raise SystemExit(main())
