"""``python -m acnet_convert`` runs the command line."""

from acnet_convert.cli import main

main()
