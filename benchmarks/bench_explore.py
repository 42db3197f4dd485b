"""The feature explorer's limits on this machine: page build time and file size, and the time from a click to the
updated heatmaps in headless Chromium (Debian's chromium and chromium-driver, driven by selenium).

For each architecture (random weights: the timings do not depend on the values) and photo count, at --image-size:
  * extract: the FeatureExtractor on the photos (CPU, fp32);
  * build: the page from the features (float16 encoding, error measurement, PCA maps at every threshold, photos);
  * size: the HTML file;
  * load: from opening the file to the page being ready (decoding the features);
  * click: from the click event to the next painted frame with every heatmap redrawn (median of --clicks clicks on
    random patches, through selenium's pointer actions), and the similarity computation alone.

With --at-limit: a page at the stored-values limit instead (two models of width 1024, MAX_PHOTOS square photos at
224 px, random features: no model runs), to measure the largest page the limits allow.

Run: python benchmarks/bench_explore.py [--archs capi_vits14 capi_vitl14] [--photos 10 50] [--image-size 224]
     python benchmarks/bench_explore.py --at-limit
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capi_backbones.features import FeatureExtractor
from capi_backbones.pretrained import create_model
from capi_backbones.viz.explore import (
    MAX_PHOTOS,
    MAX_STORED_VALUES,
    ModelFeatures,
    build_explorer,
    extract_model_features,
)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def photos(n: int) -> list[Image.Image]:
    """n different real photos: scikit-image's and scikit-learn's, then crops and mirror images of them."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina"]
    base = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]
    base += [Image.fromarray(image) for image in load_sample_images().images]
    out = []
    for i in range(n):
        image = base[i % len(base)]
        variant = i // len(base)
        if variant:
            w, h = image.size
            f = 0.9 - 0.08 * (variant % 5)
            left, top = int((1 - f) * w * (variant % 2)), int((1 - f) * h * ((variant // 2) % 2))
            image = image.crop((left, top, left + int(f * w), top + int(f * h)))
            if variant % 2:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(image)
    return out


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def measure_page(driver, path: Path, clicks: int) -> dict:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.perf_counter()
    driver.get(path.as_uri())
    WebDriverWait(driver, 120).until(lambda d: d.execute_script("return !!(window.capiExplorer||{}).ready"))
    load = time.perf_counter() - start
    tiles = driver.find_elements(By.CSS_SELECTOR, ".tile.similarity")
    rng = np.random.default_rng(0)
    to_paint, compute = [], []
    for _ in range(clicks):
        tile = tiles[int(rng.integers(len(tiles)))]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", tile)
        size = tile.size  # selenium's offsets are from the centre of the element
        x = int(rng.integers(-size["width"] // 2 + 2, size["width"] // 2 - 2))
        y = int(rng.integers(-size["height"] // 2 + 2, size["height"] // 2 - 2))
        ActionChains(driver).move_to_element_with_offset(tile, x, y).click().perform()
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script("return capiExplorer.state.painted === capiExplorer.state.updates")
        )
        state = driver.execute_script("return capiExplorer.state")
        to_paint.append(state["lastInputToPaintMs"])
        compute.append(state["lastComputeMs"])
    return {
        "load_s": round(load, 2),
        "click_to_paint_ms_median": round(statistics.median(to_paint), 1),
        "click_to_paint_ms_max": round(max(to_paint), 1),
        "compute_and_draw_ms_median": round(statistics.median(compute), 1),
    }


def at_limit(driver, clicks: int) -> None:
    rng = np.random.default_rng(0)
    width, grid = 1024, (16, 16)
    assert 2 * MAX_PHOTOS * grid[0] * grid[1] * width == MAX_STORED_VALUES
    images = [image.resize((224, 224)) for image in photos(MAX_PHOTOS)]
    models = [
        ModelFeatures(name, [rng.standard_normal((*grid, width), dtype=np.float32) for _ in images])
        for name in ("A", "B")
    ]
    start = time.perf_counter()
    page = build_explorer(images, models)
    build = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "limit.html"
        path.write_text(page, encoding="utf-8")
        row = {"page": "at the limit: 2 models x 64 photos x 256 patches x 1024", "build_s": round(build, 1)}
        row["size_mb"] = round(path.stat().st_size / 1e6, 1)
        if driver is not None:
            row.update(measure_page(driver, path, clicks))
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["capi_vits14", "capi_vitl14"])
    parser.add_argument("--photos", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--clicks", type=int, default=7)
    parser.add_argument("--no-browser", action="store_true", help="build the pages only")
    parser.add_argument("--at-limit", action="store_true", help="one page at the stored-values limit")
    args = parser.parse_args()
    driver = None if args.no_browser else browser()
    if args.at_limit:
        try:
            at_limit(driver, args.clicks)
        finally:
            if driver is not None:
                driver.quit()
        return
    all_photos = photos(max(args.photos))
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for arch in args.archs:
                torch.manual_seed(0)
                extractor = FeatureExtractor(
                    create_model(arch, pretrained=False), device="cpu", image_size=args.image_size
                )
                for n in args.photos:
                    images = all_photos[:n]
                    start = time.perf_counter()
                    features = extract_model_features(images, extractor, name=f"{arch} (random init)")
                    extract = time.perf_counter() - start
                    start = time.perf_counter()
                    page = build_explorer(images, features)
                    build = time.perf_counter() - start
                    path = Path(tmp) / f"{arch}-{n}.html"
                    path.write_text(page, encoding="utf-8")
                    row = {
                        "arch": arch,
                        "photos": n,
                        "image_size": args.image_size,
                        "patches": sum(m.shape[0] * m.shape[1] for m in features.feature_maps),
                        "extract_s": round(extract, 1),
                        "build_s": round(build, 1),
                        "size_mb": round(path.stat().st_size / 1e6, 1),
                    }
                    if driver is not None:
                        row.update(measure_page(driver, path, args.clicks))
                    print(json.dumps(row), flush=True)
                    results.append(row)
    finally:
        if driver is not None:
            driver.quit()


if __name__ == "__main__":
    sys.exit(main())
