"""``python -m webhookd`` runs the CLI."""

from webhookd.cli import main

main()
