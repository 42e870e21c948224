"""`python -m cli ...` is `unsafe-experts ...` (torchrun can also run the console script with
`--no-python unsafe-experts`)."""
import sys

from cli.main import main

sys.exit(main())
