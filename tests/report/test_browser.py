"""tests/report/browser.py on small self-made pages: a good one passes, and each fault is caught."""

from __future__ import annotations

import base64
import io

import pytest

from tests.report.browser import NOT_FOUND, find_chromium, is_blank, render


def _png(width: int = 40, height: int = 30, flat: bool = False) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (width, height), (200, 30, 30))
    if not flat:  # a gradient, so the picture is not one colour either
        for x in range(width):
            for y in range(height):
                image.putpixel((x, y), (6 * x, 8 * y, 120))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _page(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{name}</title></head>"
                    f"<body style='background:#fff'>{body}</body></html>")
    return path


@pytest.fixture(scope="module")
def chromium():
    binary = find_chromium()
    if binary is None:
        pytest.skip(NOT_FOUND)
    return binary


def test_a_good_page_loads_its_images_logs_nothing_and_shows_something(tmp_path, chromium):
    # the second image sits below the first viewport and loads lazily: the check must still see it load
    page = _page(tmp_path, "good", f"<h1>kdq report</h1><img alt='plot' src='{_data_uri(_png())}'>"
                                   f"<div style='height:6000px'></div>"
                                   f"<img loading='lazy' alt='curve' src='{_data_uri(_png(64, 16))}'>")
    result = render(page, tmp_path / "good.png", chromium=chromium)
    assert [i["natural_width"] for i in result["images"]] == [40, 64]
    assert result["images_ok"] and result["console_errors"] == [] and result["failed_requests"] == []
    assert result["size"][1] > 6000  # the viewport grew to the whole page
    assert not is_blank(tmp_path / "good.png")


def test_broken_and_remote_images_are_caught(tmp_path, chromium):
    page = _page(tmp_path, "broken", f"<img src='{_data_uri(_png())}'><img src='missing.png'>"
                                     "<img src='https://example.com/plot.png'>")  # no network: never loads
    result = render(page, tmp_path / "broken.png", chromium=chromium)
    assert not result["images_ok"]
    assert [i["natural_width"] > 0 for i in result["images"]] == [True, False, False]
    assert any(u.endswith("/missing.png") for u in result["failed_requests"])
    assert "https://example.com/plot.png" in result["failed_requests"]
    assert any("ERR_FILE_NOT_FOUND" in e for e in result["console_errors"])


def test_console_errors_and_uncaught_exceptions_are_caught(tmp_path, chromium):
    page = _page(tmp_path, "noisy", "<p>text</p><script>console.log('fine'); console.error('plot failed', 2);"
                                    "document.body.dataset.x = null.y;</script>")
    result = render(page, tmp_path / "noisy.png", chromium=chromium)
    assert result["images_ok"]  # no images at all
    assert result["console_errors"][0] == "plot failed 2"
    assert "TypeError" in result["console_errors"][1] and len(result["console_errors"]) == 2
    assert {"level": "log", "text": "fine"} in result["console"]


def test_an_empty_page_renders_blank(tmp_path, chromium):
    result = render(_page(tmp_path, "empty", ""), tmp_path / "empty.png", chromium=chromium)
    assert result["images_ok"] and not result["console_errors"]
    assert is_blank(tmp_path / "empty.png")


def test_is_blank_on_pngs():
    assert is_blank(_png(flat=True)) and not is_blank(_png())


def test_render_refuses_a_missing_page(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        render(tmp_path / "nope.html", tmp_path / "nope.png", chromium="/bin/false")
