"""``python -m capi_backbones.train CONFIG [key=value ...]``: the same as ``capi-backbones train``.

Under torchrun: ``torchrun --nproc_per_node 8 -m capi_backbones.train vitl14 data.root=/data/images``.
"""

import sys

from capi_backbones.train.launch import main

if __name__ == "__main__":
    sys.exit(main())
