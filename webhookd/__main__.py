"""``python -m webhookd`` runs the CLI."""

from webhookd.entry import main

main()
