"""The explorer page in a real browser: Debian's headless Chromium driven by selenium through the system chromedriver
(selenium is given both paths: it downloads nothing). The tests click patches, read back what the page computed and
compare it with numpy on the same features, move the slider, use the keyboard, check the console and save screenshots.

Without a browser they skip with one line; with the CI variable set they fail instead (.ci/run installs chromium and
chromium-driver)."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from sklearn.datasets import load_sample_images

from capi_backbones.features import FeatureExtractor
from capi_backbones.pretrained import create_model
from capi_backbones.viz import joint_pca_maps, pca_map
from capi_backbones.viz.colormap import COOLWARM_ANCHORS
from capi_backbones.viz.explore import (
    FLOAT16_COSINE_BOUND,
    FOREGROUND_THRESHOLDS,
    extract_model_features,
    write_explorer,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.slow  # a browser start and a few model runs: about 30 s
IMAGE_SIZE = 112  # 8 patches on the shorter side: quick, and patches large enough to click


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[dev])"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def driver():
    missing = _missing_browser()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the browser tests cannot run: {missing}")
        pytest.skip(f"no browser: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def photos():
    china, flower = (Image.fromarray(image) for image in load_sample_images().images)
    return {
        "astronaut.png": Image.fromarray(data.astronaut()),
        "coffee.png": Image.fromarray(data.coffee()),
        "chelsea.png": Image.fromarray(data.chelsea()),
        "china.jpg": china,
        "flower.jpg": flower,
    }


def extractor(arch: str, seed: int) -> FeatureExtractor:
    torch.manual_seed(seed)
    return FeatureExtractor(create_model(arch, pretrained=False), device="cpu", image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def models(photos):
    images = list(photos.values())
    return [
        extract_model_features(images, extractor("capi_vits14", 0), name="ViT-S seed 0"),
        extract_model_features(images, extractor("capi_vits14", 1), name="ViT-S seed 1"),
    ]


@pytest.fixture(scope="module")
def pages(tmp_path_factory, photos, models):
    root = tmp_path_factory.mktemp("explore")
    images, labels = list(photos.values()), list(photos)
    return {
        "one": write_explorer(root / "one.html", images, models[0], labels=labels),
        "two": write_explorer(root / "two.html", images, models, labels=labels),
    }


def open_page(driver, path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return !!(window.capiExplorer || {}).ready"))
    driver.get_log("browser")  # start each test with an empty console log


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def tile(driver, kind: str, photo: int, model: int = 0):
    from selenium.webdriver.common.by import By

    card = driver.find_element(By.CSS_SELECTOR, f'.card[data-index="{photo}"]')
    tiles = card.find_elements(By.CSS_SELECTOR, f".tile.{kind}")
    return tiles[model]


def point_at_patch(driver, photo: int, row: int, col: int, grid: tuple[int, int], kind="similarity", model=0):
    """Selenium's pointer offsets count from the centre of the element: the centre of patch (row, col)."""
    from selenium.webdriver.common.action_chains import ActionChains

    element = tile(driver, kind, photo, model)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    h, w = grid
    size = element.size
    x = (col + 0.5) / w * size["width"] - size["width"] / 2
    y = (row + 0.5) / h * size["height"] - size["height"] / 2
    return ActionChains(driver).move_to_element_with_offset(element, round(x), round(y))


def exact_similarities(model, photo: int, row: int, col: int) -> np.ndarray:
    flat = np.concatenate([m.reshape(-1, m.shape[-1]).astype(np.float64) for m in model.feature_maps])
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    offsets = np.cumsum([0] + [m.shape[0] * m.shape[1] for m in model.feature_maps])
    query = offsets[photo] + row * model.feature_maps[photo].shape[1] + col
    return unit @ unit[query]


def grid(model, photo: int) -> tuple[int, int]:
    return model.feature_maps[photo].shape[:2]


def test_click_shows_the_cosine_similarities_numpy_computes(driver, pages, models, tmp_path):
    open_page(driver, pages["one"])
    photo, row, col = 2, 3, 5
    point_at_patch(driver, photo, row, col, grid(models[0], photo)).click().perform()
    state = driver.execute_script("return capiExplorer.state")
    assert (state["photo"], state["row"], state["col"]) == (photo, row, col)
    page = np.array(driver.execute_script("return capiExplorer.similarities(0)"))
    exact = exact_similarities(models[0], photo, row, col)
    assert page.shape == exact.shape
    assert np.abs(page - exact).max() <= FLOAT16_COSINE_BOUND
    # the heatmaps are drawn with coolwarm over the query's range: the most similar other patch is the top colour
    query = int(np.argmax(exact))  # the query patch itself (cosine 1)
    others = np.delete(np.arange(len(exact)), query)
    best, worst = others[np.argmax(page[others])], others[np.argmin(page[others])]
    offsets = np.cumsum([0] + [m.shape[0] * m.shape[1] for m in models[0].feature_maps])
    for index, colour in ((best, COOLWARM_ANCHORS[-1]), (worst, COOLWARM_ANCHORS[0])):
        p = int(np.searchsorted(offsets, index, side="right") - 1)
        pixels = driver.execute_script(
            "const c = document.querySelector(`.card[data-index='${arguments[0]}'] .tile.similarity canvas`);"
            "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
            p,
        )
        rgba = np.array(pixels).reshape(-1, 4)[index - offsets[p]]
        np.testing.assert_array_equal(rgba[:3], colour.astype(int))
    assert console_errors(driver) == []
    screenshot = tmp_path / "click.png"
    assert driver.save_screenshot(str(screenshot))
    with Image.open(screenshot) as image:
        assert np.asarray(image.convert("L")).std() > 20  # a page, not a blank one


def test_hover_shows_the_value_under_the_cursor_and_the_colour_bar(driver, pages, models):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(driver, pages["one"])
    point_at_patch(driver, 0, 1, 1, grid(models[0], 0)).click().perform()
    exact = exact_similarities(models[0], 0, 1, 1)
    point_at_patch(driver, 4, 2, 6, grid(models[0], 4), kind="pca").perform()  # hover, any tile of the photo
    offsets = np.cumsum([0] + [m.shape[0] * m.shape[1] for m in models[0].feature_maps])
    value = exact[offsets[4] + 2 * grid(models[0], 4)[1] + 6]
    status = driver.find_element(By.ID, "status").text
    assert "flower.jpg (row 2, col 6)" in status
    for kind in ("similarity", "pca"):  # the hovered patch is outlined on every tile of its photo
        mark = tile(driver, kind, 4).find_element(By.CSS_SELECTOR, ".hover-mark")
        assert mark.is_displayed()
        cell = tile(driver, kind, 4).size["width"] / grid(models[0], 4)[1]
        assert mark.location["x"] - tile(driver, kind, 4).location["x"] == pytest.approx(6 * cell, abs=1)
        assert mark.location["y"] - tile(driver, kind, 4).location["y"] == pytest.approx(2 * cell, abs=1)
    assert f"cosine {value:.3f}" in status
    others = np.delete(exact, offsets[0] + 1 * grid(models[0], 0)[1] + 1)
    assert driver.find_element(By.CSS_SELECTOR, ".colorbar .lo").text == f"{others.min():.3f}"
    assert driver.find_element(By.CSS_SELECTOR, ".colorbar .hi").text == f"{others.max():.3f}"
    assert driver.find_element(By.CSS_SELECTOR, ".colorbar .marker").is_displayed()
    Select(driver.find_element(By.ID, "scale")).select_by_value("fixed")
    assert driver.find_element(By.CSS_SELECTOR, ".colorbar .lo").text == "-1.000"
    assert driver.find_element(By.CSS_SELECTOR, ".colorbar .hi").text == "1.000"
    assert console_errors(driver) == []


def test_follow_the_mouse_queries_the_patch_under_the_cursor(driver, pages, models):
    from selenium.webdriver.common.by import By

    open_page(driver, pages["one"])
    driver.find_element(By.ID, "hover").click()
    point_at_patch(driver, 3, 5, 2, grid(models[0], 3)).perform()  # no click
    state = driver.execute_script("return capiExplorer.state")
    assert (state["photo"], state["row"], state["col"]) == (3, 5, 2)
    page = np.array(driver.execute_script("return capiExplorer.similarities(0)"))
    assert np.abs(page - exact_similarities(models[0], 3, 5, 2)).max() <= FLOAT16_COSINE_BOUND
    assert console_errors(driver) == []


def test_photos_ranked_by_pooled_similarity(driver, pages, models):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(driver, pages["one"])
    point_at_patch(driver, 1, 2, 2, grid(models[0], 1)).click().perform()
    Select(driver.find_element(By.ID, "order")).select_by_visible_text("pooled similarity")
    order = [int(card.get_attribute("data-index")) for card in driver.find_elements(By.CSS_SELECTOR, ".card")]
    pooled = models[0].pooled / np.linalg.norm(models[0].pooled, axis=1, keepdims=True)
    assert order == list(np.argsort(-(pooled @ pooled[1]), kind="stable"))
    assert order[0] == 1
    assert console_errors(driver) == []


def test_threshold_slider_and_joint_mode_draw_the_viz_pca_maps(driver, pages, models, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    open_page(driver, pages["one"])
    maps = models[0].feature_maps

    def drawn(photo):
        rgba = np.array(driver.execute_script("return capiExplorer.pcaPixels(0, arguments[0])", photo))
        return rgba.reshape(*maps[photo].shape[:2], 4)

    def check(results):
        for photo, result in enumerate(results):
            pixels = drawn(photo)
            if isinstance(result, str):  # no map at this threshold: grey, with the reason on the tile
                assert (pixels == [96, 96, 96, 255]).all()
                note = tile(driver, "pca", photo).find_element(By.CSS_SELECTOR, ".note")
                assert note.is_displayed() and note.text == "no map: " + result.split(". ")[0] + "."
                continue
            np.testing.assert_array_equal(pixels[..., :3], np.rint(result.rgb * 255).astype(np.uint8))
            assert (pixels[..., 3] == 255).all()

    def per_image(threshold):
        out = []
        for m in maps:
            try:
                out.append(pca_map(m, foreground_threshold=threshold))
            except ValueError as error:
                out.append(str(error))
        return out

    check(per_image(None))
    slider = driver.find_element(By.ID, "threshold")
    steps = FOREGROUND_THRESHOLDS.index(0.5) + 1
    slider.click()  # the middle of the slider; Home goes back to the first position ("off")
    slider.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * steps)
    assert driver.find_element(By.ID, "threshold-value").text == "T = 0.50"
    check(per_image(0.5))
    Select(driver.find_element(By.ID, "pca-mode")).select_by_value("joint")
    check(joint_pca_maps(maps, foreground_threshold=0.5))
    slider.send_keys(Keys.END)  # 2.0 standard deviations: some photos keep too few patches
    check(_joint_or_error(maps, FOREGROUND_THRESHOLDS[-1]))
    assert console_errors(driver) == []
    assert driver.save_screenshot(str(tmp_path / "slider.png"))


def _joint_or_error(maps, threshold):
    try:
        return joint_pca_maps(maps, foreground_threshold=threshold)
    except ValueError as error:
        return [str(error)] * len(maps)


def test_keyboard_selects_and_moves_the_patch(driver, pages, models):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(driver, pages["one"])
    driver.execute_script("document.getElementById('tile-size').focus()")  # the last control before the photos
    ActionChains(driver).send_keys(Keys.TAB, Keys.TAB).perform()  # "follow the mouse", then the first photo
    assert driver.execute_script("return document.activeElement.dataset.index") == "0"
    ActionChains(driver).send_keys(Keys.TAB).perform()
    assert driver.execute_script("return document.activeElement.dataset.index") == "1"
    h, w = grid(models[0], 1)

    def selected():
        state = driver.execute_script("return capiExplorer.state")
        return state["photo"], state["row"], state["col"]

    ActionChains(driver).send_keys(Keys.ENTER).perform()
    assert selected() == (1, h // 2, w // 2)
    ActionChains(driver).send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_UP).perform()
    assert selected() == (1, h // 2 - 1, w // 2 + 2)
    page = np.array(driver.execute_script("return capiExplorer.similarities(0)"))
    assert np.abs(page - exact_similarities(models[0], 1, h // 2 - 1, w // 2 + 2)).max() <= FLOAT16_COSINE_BOUND
    ActionChains(driver).send_keys(*[Keys.ARROW_LEFT] * (w + 3)).perform()  # stops at the edge
    assert selected() == (1, h // 2 - 1, 0)
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    assert selected()[0] == -1
    assert driver.execute_script("return capiExplorer.similarities(0)") is None
    assert console_errors(driver) == []


def test_two_models_side_by_side(driver, pages, models, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(driver, pages["two"])
    assert len(driver.find_elements(By.CSS_SELECTOR, ".card .tile.similarity")) == 2 * len(models[0].feature_maps)
    assert len(driver.find_elements(By.CSS_SELECTOR, ".colorbar")) == 2
    photo, row, col = 3, 4, 7
    point_at_patch(driver, photo, row, col, grid(models[1], photo), model=1).click().perform()  # B's tile
    for m, model in enumerate(models):
        page = np.array(driver.execute_script("return capiExplorer.similarities(arguments[0])", m))
        assert np.abs(page - exact_similarities(model, photo, row, col)).max() <= FLOAT16_COSINE_BOUND
    a, b = (exact_similarities(model, photo, row, col) for model in models)
    assert np.abs(a - b).max() > 0.05  # two different models: the test would see a mix-up
    assert "A: ViT-S seed 0" in driver.find_element(By.ID, "summary").text
    assert console_errors(driver) == []
    assert driver.save_screenshot(str(tmp_path / "compare.png"))
