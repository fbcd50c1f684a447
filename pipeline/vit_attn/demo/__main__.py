"""`python -m vit_attn.demo`: the same as `vit-attn demo`."""

import sys

from .driver import main

sys.exit(main())
