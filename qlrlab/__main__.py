"""``python -m qlrlab`` (and ``torchrun ... -m qlrlab run RUN.yaml``) runs the CLI."""

import sys

from qlrlab.cli import main

sys.exit(main())
