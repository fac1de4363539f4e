"""``python -m intro2llm`` (also what ``torchrun ... -m intro2llm train`` runs)."""

import sys

from intro2llm.cli import main

sys.exit(main())
