"""The web page at `/`, in a real headless browser (Debian's chromium driven by Playwright; no browser download)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from bigmodel import api
from bigmodel.config import validate_recipe
from conftest import ServerProcess, tiny_recipe, train_lm_fixture_run, train_text_fixture_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium (apt-get install chromium; scripts/setup.sh does)"
)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_text_page_predicts(browser, tmp_path):
    server = ServerProcess(train_text_fixture_run(tmp_path))
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        assert "text model" in page.text_content("#about")
        page.fill("#text", "great fun\nawful plot")
        page.click("#go")
        page.wait_for_selector(".prediction")
        cells = page.locator(".prediction .label").all_text_contents()
        # two inputs, top-3 of two labels each → the first label of each row is the prediction
        assert cells[0] == "pos" and cells[2] == "neg"
        if importlib.util.find_spec("captum") is not None:  # explain: the tokens, coloured by their score
            page.click("#explain")
            page.wait_for_selector(".explanation .tok")
            assert page.locator(".explanation").count() == 2
            assert page.locator(".explanation .tok").all_text_contents()[-2:] == ["awful", "plot"]
    finally:
        server.stop()


def test_image_page_draws_and_predicts(browser, tmp_path):
    api.train(validate_recipe(tiny_recipe()), out=tmp_path / "run", progress=False)
    server = ServerProcess(tmp_path / "run", "--api-key", "k1")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        box = page.locator("#pad").bounding_box()
        page.mouse.move(box["x"] + 140, box["y"] + 40)
        page.mouse.down()
        page.mouse.move(box["x"] + 140, box["y"] + 240, steps=10)  # a vertical stroke: a "1"
        page.mouse.up()
        page.click("#go")
        page.wait_for_selector("#error:not(:empty)")
        assert "401" in page.text_content("#error")  # the key box is there and needed
        page.fill("#key", "k1")
        page.click("#go")
        page.wait_for_selector(".prediction")
        labels = page.locator(".prediction .label").all_text_contents()
        assert len(labels) == 3 and all(lbl in [str(i) for i in range(10)] for lbl in labels)
        if importlib.util.find_spec("captum") is not None:  # explain: the heat map over the drawn digit
            page.select_option("#method", "gradcam")
            page.click("#explain")
            page.wait_for_selector("img.heatmap")
            src = page.get_attribute("img.heatmap", "src")
            assert src.startswith("data:image/png;base64,")
            size = page.evaluate(
                "() => { const i = document.querySelector('img.heatmap'); return [i.naturalWidth, i.naturalHeight]; }"
            )
            assert size[0] > 100 and size[1] > 50  # decoded: the picture beside its heat map
            assert "Grad-CAM" in page.text_content(".explanation")
    finally:
        server.stop()


def test_language_model_page_streams_generated_text(browser, tmp_path):
    server = ServerProcess(train_lm_fixture_run(tmp_path))
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        assert "language model" in page.text_content("#about")
        page.fill("#prompt", "All:\n")
        page.fill("#ntok", "40")
        page.click("#go")
        page.wait_for_selector("#generated[data-done='1']")
        text = page.text_content("#generated")
        assert text.startswith("All:") and len(text) > 20
    finally:
        server.stop()
