"""Heatmap panels (cxr.explain.render) on a real NIH radiograph."""

import io
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from cxr.explain.render import overlay_title, render_disagreement, render_overlay, turbo_lut

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
IMAGE = DATA / "nih-cxr14-621" / "images_512" / "00000075_000.png"


@pytest.fixture(scope="module")
def radiograph() -> np.ndarray:
    return np.asarray(Image.open(IMAGE).convert("L"))


def _central_block(grid: int = 64) -> np.ndarray:
    """Heat 1 on the central block (rows/cols 3/8..5/8 of the grid: 24..40 of 64), 0 elsewhere."""
    heat = np.zeros((grid, grid), np.float32)
    heat[grid * 3 // 8 : grid * 5 // 8, grid * 3 // 8 : grid * 5 // 8] = 1.0
    return heat


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


def test_overlay_is_a_png_of_the_display_size_coloured_only_where_heat_is(radiograph: np.ndarray) -> None:
    png = render_overlay(radiograph, _central_block(), title="Atelectasis", subtitle="fused Grad-CAM")
    image = _decode(png)
    assert image.size == (512, 512) and image.mode == "RGB"
    rgb = np.asarray(image).astype(int)
    grey = radiograph.astype(int)
    hot = (slice(216, 296), slice(216, 296))  # well inside the heat block (192..320 at 512 px)
    cold = (slice(100, 160), slice(20, 120))  # zero heat, away from title, footer and colour bar
    assert np.abs(rgb[hot] - grey[hot][..., None]).mean() > 30
    assert np.array_equal(rgb[cold], np.repeat(grey[cold][..., None], 3, axis=-1))


def test_overlay_keeps_the_display_shape_when_not_square(radiograph: np.ndarray) -> None:
    display = radiograph[:400, 100:400]  # 400 rows x 300 columns
    image = _decode(render_overlay(display, _central_block(16), title="t", subtitle="s"))
    assert image.size == (300, 400)
    rgb = np.asarray(image).astype(int)
    assert np.abs(rgb[200, 150] - int(display[200, 150])).max() > 30  # centre is hot after stretching


def test_uint8_and_float_inputs_render_alike(radiograph: np.ndarray) -> None:
    heat = _central_block()
    a = np.asarray(_decode(render_overlay(radiograph, heat, title="x", subtitle="y"))).astype(int)
    b = np.asarray(
        _decode(render_overlay(radiograph / 255.0, (heat * 255).astype(np.uint8), title="x", subtitle="y"))
    ).astype(int)
    assert np.abs(a - b).max() <= 1


def test_title_warning_and_colour_bar_are_drawn(radiograph: np.ndarray) -> None:
    zero = np.zeros((8, 8), np.float32)
    short = np.asarray(_decode(render_overlay(radiograph, zero, title="A", subtitle="")))
    long = np.asarray(_decode(render_overlay(radiograph, zero, title=overlay_title("Effusion", 0.9, 2, 3),
                                             subtitle="")))  # fmt: skip
    assert not np.array_equal(short[:20], long[:20])  # the title text is in the top band
    footer = short[-20:].astype(int)
    red_text = (footer[..., 0] > 200) & (footer[..., 1] < 140)
    assert red_text.sum() > 20  # "NOT FOR CLINICAL USE" in red on a darkened band
    strip = short[256, 470:505].astype(int)  # the colour bar sits on the right edge, mid-height
    assert (strip.max(axis=-1) - strip.min(axis=-1)).max() > 60  # saturated colours, not grey


def test_disagreement_panel_scales_std_to_half(radiograph: np.ndarray) -> None:
    std = _central_block() * 0.5
    a = _decode(render_disagreement(radiograph, std, title="Effusion: disagreement"))
    b = _decode(render_disagreement(radiograph, np.round(std * 255).astype(np.uint8), title="Effusion: disagreement"))
    assert a.size == (512, 512)
    rgb = np.asarray(a).astype(int)
    assert np.abs(rgb - np.asarray(b).astype(int)).max() <= 1
    assert np.abs(rgb[250, 250] - int(radiograph[250, 250])).max() > 30
    assert np.array_equal(rgb[130, 60], [radiograph[130, 60]] * 3)


def test_overlay_title_reads_like_the_paper() -> None:
    assert overlay_title("Atelectasis", 0.5831, 3, 5) == "Atelectasis — probability 0.583 — agreement 3 of 5 models"
    assert overlay_title("Mass", 0.1, 1, 1).endswith("agreement 1 of 1 model")


def test_turbo_lut_is_close_to_the_reference_turbo() -> None:
    lut = turbo_lut()
    reference = matplotlib.colormaps["turbo"](np.linspace(0, 1, 256))[:, :3] * 255
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert np.abs(lut - reference).max() <= 4


@pytest.mark.parametrize(
    ("display", "heat"),
    [
        (np.zeros((64, 64, 3), np.uint8), np.zeros((8, 8))),  # colour display
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8))),  # too small to draw on
        (np.zeros((64, 64), np.uint8), np.full((8, 8), np.nan)),  # NaN heat
        (np.zeros((64, 64), np.uint8), np.zeros(8)),  # 1-D heat
        (np.array([["a"] * 64] * 64), np.zeros((8, 8))),  # text, not pixels
        (np.zeros((64, 64), np.uint16), np.zeros((8, 8))),  # 16-bit pixels: the caller must window them first
    ],
)
def test_bad_inputs_raise_value_error(display: np.ndarray, heat: np.ndarray) -> None:
    with pytest.raises(ValueError):
        render_overlay(display, heat, title="t", subtitle="s")


def test_render_module_needs_neither_torch_nor_matplotlib() -> None:
    code = "import sys, cxr.explain.render; print(sorted({'torch', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
