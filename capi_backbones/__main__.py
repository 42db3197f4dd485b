"""``python -m capi_backbones``: the ``capi-backbones`` command line."""

import sys

from capi_backbones.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
