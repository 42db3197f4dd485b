#!/usr/bin/env bash
# Smoke test of an installed capi-backbones (a wheel, not the checkout), as a new user would try it, offline.
# Usage: .ci/smoke.sh REPO_DIR   with the environment's bin/ first on PATH; runs in a new temporary folder.
# REPO_DIR is a checkout, for torch.hub's source="local". Exits non-zero at the first failing step.
set -euo pipefail
REPO="$(cd "$1" && pwd)"
cd "$(mktemp -d)"
echo "smoke test in $PWD"

python - <<'PY'
import capi_backbones
assert "site-packages" in capi_backbones.__file__, f"imported the checkout, not the install: {capi_backbones.__file__}"
PY
version="$(python -c 'import capi_backbones; print(capi_backbones.__version__)')"
test "$(capi-backbones --version)" = "capi-backbones $version"
capi-backbones --help | grep "extract" >/dev/null
capi-backbones list | grep "capi_vitl14_lvd" >/dev/null

# a checkpoint in the official layout (random ViT-S/14) and two real photos saved as JPEG
mkdir photos
python - <<'PY'
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

import capi_backbones
from capi_backbones.pretrained import save_official_checkpoint

torch.manual_seed(0)
save_official_checkpoint(capi_backbones.create_model("capi_vits14"), "vits14.pth")
for name in ("china.jpg", "flower.jpg"):
    Image.fromarray(load_sample_image(name)).save(f"photos/{name}")
PY
capi-backbones info vits14.pth | tee info.txt
grep -q "strict load:  OK" info.txt

python - "$REPO" <<'PY'
import sys

import torch

model = torch.hub.load(sys.argv[1], "capi_vits14", source="local", pretrained=False)
with torch.inference_mode():
    pooled, registers, feature_map = model(torch.randn(1, 3, 56, 56))
assert feature_map.shape == (1, 4, 4, 384), feature_map.shape
print("torch.hub from the checkout: OK")
PY

capi-backbones extract photos --out features --weights vits14.pth --device cpu --image-size 112 --no-progress
python - <<'PY'
from capi_backbones.features import load_saved_features

shards = list(load_saved_features("features"))
names = sorted(name for shard in shards for name in shard.files)
assert len(names) == 2 and all(s.patch_features.shape[-1] == 384 for s in shards), (names, shards)
print("extract: OK", names)
PY

capi-backbones pca photos --weights vits14.pth --out pca.png --device cpu --image-size 112 --no-progress
python -c "from PIL import Image; image = Image.open('pca.png'); assert image.format == 'PNG', image.format; print('pca: OK', image.size)"
echo "smoke test passed"
