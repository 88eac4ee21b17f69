"""`python -m mailfc` is the `mailfc` command."""

from mailfc.cli.main import main

main()
