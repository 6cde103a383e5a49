"""Static export: kaleido renders a figure to PNG with Debian's chromium, and it is not blank."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from diagnostics import Recording
from diagnostics.record.recording import frame_from_rows
from diagnostics.views.figures import save_figure, spectrum_figure

pytestmark = pytest.mark.browser


def _recording() -> Recording:
    """Two layers whose eigenvalues spread over 4 decades and change over 5 steps."""
    rows = [
        {"step": s, "layer": layer, "factor": "K", "index": i,
         "value": float(10.0 ** (-4 * i / 15) * (1 + 0.2 * s))}
        for s in range(5) for layer in ("0", "2") for i in range(16)
    ]  # fmt: skip
    return Recording(name="run", spectra=frame_from_rows("spectra", rows))


def test_save_figure_png_via_kaleido_is_a_real_picture(chromium_path, monkeypatch, tmp_path,
                                                       png_colours):  # fmt: skip
    # kaleido (choreographer) uses BROWSER_PATH first: point it at Debian's chromium
    monkeypatch.setenv("BROWSER_PATH", chromium_path)
    fig = spectrum_figure(_recording())
    path = save_figure(fig, tmp_path / "spectrum.png", width=640, height=420, scale=1)

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    (height, width), n_colours = png_colours(data)
    assert (height, width) == (420, 640)
    # a heatmap with a colour bar, axes and text: many colours, not one flat fill
    assert n_colours > 100


def _encode_png(img: np.ndarray) -> bytes:
    """Encode an (h, w, 3) uint8 image as PNG, row y with filter type y % 5 (all five)."""
    h, w, ch = img.shape
    flat = img.reshape(h, w * ch).astype(np.int64)
    rows = []
    for y in range(h):
        cur = flat[y]
        up = flat[y - 1] if y else np.zeros_like(cur)
        left = np.concatenate([np.zeros(ch, dtype=np.int64), cur[:-ch]])
        upleft = np.concatenate([np.zeros(ch, dtype=np.int64), up[:-ch]])
        p = left + up - upleft
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        pred = [np.zeros_like(cur), left, up, (left + up) // 2, paeth][y % 5]
        rows.append(bytes([y % 5]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))  # fmt: skip


def test_png_decoder_used_by_the_checks_undoes_all_five_filters(png_decoder):
    img = np.random.default_rng(0).integers(0, 256, size=(11, 6, 3), dtype=np.uint8)
    assert np.array_equal(png_decoder(_encode_png(img)), img)
