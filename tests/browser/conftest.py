"""Shared fixtures of the real-browser checks: Debian's chromium driven by Python playwright.

The browser is never downloaded: playwright launches the ``chromium`` found on ``PATH``
(``make chromium`` installs Debian's package where missing). Where there is none every
test here skips and says why. Pages are opened in contexts that refuse every request
outside the allowed URL prefixes and keep a list of what was attempted, so tests can
assert that nothing went to the network.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Path of Debian's chromium; skips (with the reason) where it is not installed."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip(
            "chromium not found: no `chromium` on PATH (`make chromium` installs Debian's "
            "package; it needs root and apt-get), so the real-browser checks cannot run"
        )
    return path


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Any]:
    """One headless chromium for the whole session, closed at the end."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Watched:
    """A page plus everything it tried and reported: requests, blocked URLs, errors."""

    page: Any
    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        """Console errors and uncaught page errors, in one list."""
        return self.console_errors + [f"pageerror: {e}" for e in self.page_errors]


@pytest.fixture
def watched_page(browser: Any) -> Iterator[Callable[..., Watched]]:
    """``watched_page(allow=("file://",))``: a fresh page that aborts other requests.

    Every request (allowed or not) and websocket URL is recorded, as are console errors
    and uncaught page errors. Contexts are closed after the test.
    """
    contexts: list[Any] = []

    def make(allow: Sequence[str] = ("file://",), viewport: dict | None = None) -> Watched:
        ctx = browser.new_context(viewport=viewport or {"width": 1400, "height": 1000})
        contexts.append(ctx)
        page = ctx.new_page()
        w = Watched(page)

        def route(r: Any) -> None:
            url = r.request.url
            if url.startswith(tuple(allow)) or url.startswith(("data:", "blob:")):
                r.continue_()
            else:
                w.blocked.append(url)
                r.abort("blockedbyclient")

        ctx.route("**/*", route)
        page.on("request", lambda req: w.requests.append(req.url))
        page.on("websocket", lambda ws: w.websockets.append(ws.url))
        page.on(
            "console",
            lambda m: (
                w.console_errors.append(f"console.{m.type}: {m.text}")
                if m.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda e: w.page_errors.append(str(e)))
        return w

    yield make
    for ctx in contexts:
        ctx.close()


def decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit, non-interlaced grey/RGB/RGBA PNG into a (height, width, channels) array.

    A small reader for the checks (no Pillow in the environment) implementing the five
    scanline filters of the PNG specification; rows with the "none", "sub" and "up"
    filters are undone with numpy, "average" and "Paeth" rows byte by byte.
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, bytearray(), None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without IHDR chunk")
    width, height, depth, colour, _, _, interlace = header
    ch = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 8 or ch is None or interlace != 0:
        raise ValueError(f"unsupported PNG: depth {depth}, colour {colour}, interlace {interlace}")
    stride = width * ch
    raw = np.frombuffer(zlib.decompress(bytes(idat)), dtype=np.uint8)
    raw = raw[: height * (stride + 1)].reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        ftype, line = int(raw[y, 0]), raw[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:  # sub: running sum along each channel
            cur = np.cumsum(line.reshape(width, ch), axis=0, dtype=np.uint64) % 256
            cur = cur.astype(np.uint8).reshape(stride)
        elif ftype == 2:  # up
            cur = line + prev
        elif ftype in (3, 4):  # average, Paeth: sequential along the row
            cur = bytearray(line.tobytes())
            up = prev.tolist()
            for i in range(stride):
                a = cur[i - ch] if i >= ch else 0
                b = up[i]
                if ftype == 3:
                    cur[i] = (cur[i] + (a + b) // 2) & 0xFF
                else:
                    c = up[i - ch] if i >= ch else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    cur[i] = (cur[i] + pred) & 0xFF
            cur = np.frombuffer(bytes(cur), dtype=np.uint8)
        else:
            raise ValueError(f"bad PNG filter type {ftype} in row {y}")
        out[y] = cur
        prev = out[y]
    return out.reshape(height, width, ch)


def distinct_colours(pixels: np.ndarray) -> int:
    """Number of distinct pixel values (colour + alpha) in a decoded image."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    return len(np.unique(flat, axis=0))


@pytest.fixture(scope="session")
def png_decoder() -> Callable[[bytes], np.ndarray]:
    """``decode_png`` for the test modules: PNG bytes -> (height, width, channels) array."""
    return decode_png


@pytest.fixture(scope="session")
def png_colours() -> Callable[[bytes], tuple[tuple[int, int], int]]:
    """``png_colours(data) -> ((height, width), number of distinct pixel values)``."""

    def colours(data: bytes) -> tuple[tuple[int, int], int]:
        pixels = decode_png(data)
        return pixels.shape[:2], distinct_colours(pixels)

    return colours
