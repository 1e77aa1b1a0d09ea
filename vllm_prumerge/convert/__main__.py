"""`python -m vllm_prumerge.convert ...`, the same as `vllm-prumerge convert ...`."""

import sys

from vllm_prumerge.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
