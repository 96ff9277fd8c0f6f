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
        args = ["--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
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


@pytest.mark.skipif(importlib.util.find_spec("soundfile") is None, reason="the audio extra is not installed")
def test_audio_page_uploads_and_records(browser, tmp_path):
    import yaml

    from test_audio import audio_recipe, make_audio_folder

    root = make_audio_folder(tmp_path / "data", per_class=6)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**audio_recipe(root), "train": {"epochs": 1, "batch_size": 8}}))
    api.train(validate_recipe(yaml.safe_load(recipe.read_text())), out=tmp_path / "run", progress=False)
    server = ServerProcess(tmp_path / "run")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        assert "audio model" in page.text_content("#about") and page.is_hidden("#explain-row")
        page.click("#go")
        page.wait_for_selector("#error:not(:empty)")
        assert "upload or record" in page.text_content("#error")
        page.set_input_files("#audio-file", str(next((root / "test" / "low").iterdir())))
        page.click("#go")
        page.wait_for_selector(".prediction")
        assert page.locator(".prediction .label").all_text_contents()[0] in ("low", "high")
        # a recording (chromium's fake microphone: a beep) is encoded as a WAV and predicted
        page.click("#record")
        page.wait_for_timeout(800)
        page.click("#record")
        page.wait_for_selector("#audio-player:not(.hidden)")
        page.evaluate("() => { document.getElementById('results').innerHTML = ''; }")
        page.click("#go")
        page.wait_for_selector(".prediction")
        assert page.locator(".prediction .label").all_text_contents()[0] in ("low", "high")
    finally:
        server.stop()


@pytest.mark.skipif(
    importlib.util.find_spec("soundfile") is None or importlib.util.find_spec("jiwer") is None,
    reason="the audio extra is not installed",
)
def test_speech_page_uploads_records_and_transcribes(browser, tmp_path):
    from test_speech import tones_asr

    d = tones_asr(tmp_path, epochs=1)
    expected = api.predict(d / "run", [d / "0.flac"])[0]["text"]
    server = ServerProcess(d / "run")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        assert "speech recognition model" in page.text_content("#about") and page.is_hidden("#explain-row")
        assert page.text_content("#go") == "Transcribe" and page.is_hidden("#topk-row")
        page.set_input_files("#audio-file", str(d / "0.flac"))
        page.click("#go")
        page.wait_for_selector("td.prediction")
        assert page.text_content("td.prediction") == expected
        page.click("#record")  # chromium's fake microphone, encoded as a WAV in the page
        page.wait_for_timeout(800)
        page.click("#record")
        page.wait_for_selector("#audio-player:not(.hidden)")
        page.evaluate("() => { document.getElementById('results').innerHTML = ''; }")
        page.click("#go")
        page.wait_for_selector("td.prediction")
        assert page.text_content("#error") == ""
    finally:
        server.stop()
