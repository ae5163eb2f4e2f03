"""`python -m llmslim ...` (and `accelerate launch -m llmslim run recipe.yaml`): the llmslim command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
