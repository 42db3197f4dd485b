"""End to end on real images: `capi-backbones train tiny` -> `capi-backbones export` -> from_pretrained,
FeatureExtractor and `capi-backbones extract` with the exported weights."""

import json

import pytest
import torch
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from capi_backbones.cli.main import main
from capi_backbones.features import FeatureExtractor
from capi_backbones.pretrained import from_pretrained

pytestmark = pytest.mark.slow


def write_real_images(folder):
    (folder / "skimage").mkdir(parents=True)
    (folder / "sklearn").mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera"):
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(folder / "skimage" / f"{name}.jpg")
    for i, array in enumerate(load_sample_images().images):
        Image.fromarray(array).save(folder / "sklearn" / f"sample_{i}.png")
    return folder


def test_train_export_and_use_the_backbone(tmp_path):
    images = write_real_images(tmp_path / "images")
    run = tmp_path / "run"
    overrides = [f"data.root={images}", f"train.output_dir={run}", "optim.total_steps=8", "optim.batch_size=8",
                 "train.log_every=4", "train.checkpoint_every=3", "train.keep_checkpoints=1"]  # fmt: skip
    assert main(["train", "tiny", *overrides]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["clustering_loss"]])).all() for r in records)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-00000008.pt"]
    assert (run / "loss_curves.png").exists() and (run / "config.yaml").exists()

    # running the finished command again resumes and has nothing left to do
    assert main(["train", "tiny", *overrides]) == 0

    out = tmp_path / "capi_tiny.safetensors"
    assert main(["export", str(run), str(out)]) == 0
    model = from_pretrained(out)
    assert model.config.embed_dim == 128 and model.config.depth == 4

    extractor = FeatureExtractor(weights=out, image_size=112, device="cpu")
    features = extractor(images / "skimage" / "chelsea.jpg")
    assert features.pooled.shape == (1, 128) and torch.isfinite(features.pooled).all()
    assert features.patch_features.shape[-1] == 128

    pth = tmp_path / "capi_tiny.pth"
    assert main(["export", str(run), str(pth)]) == 0
    assert main(["extract", str(images / "sklearn"), "--out", str(tmp_path / "features"), "--weights", str(pth),
                 "--image-size", "112", "--no-progress", "--workers", "0"]) == 0  # fmt: skip
    assert (tmp_path / "features" / "index.json").exists()
