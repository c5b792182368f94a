"""Offscreen renders of the live viewer (vispy egl, EGL_PLATFORM=surfaceless) and its subscriber.

The pixels are checked per panel (rectangles from ``LiveView.panel_rects``): the image is drawn
and follows its input, the PSD panel has the curve, floor and cut-off at the right place, the
status bar has text that greys out when stale. The subscriber keeps only the newest preview,
and ``run_viewer`` writes a snapshot from a live ZMQ stream.
"""

from __future__ import annotations

import itertools
import struct
import threading
import time

import numpy as np
import pytest
import zmq

from stream.publish import encode_message
from tests.previews import preview_message, preview_sequence, star_image
from viewers.live import (
    CUTOFF_COLOR,
    FLOOR_COLOR,
    PSD_COLOR,
    STALE_TEXT,
    TEXT,
    LiveView,
    render_previews,
    run_viewer,
    use_app,
)
from viewers.model import ViewModel
from viewers.subscriber import PreviewSubscriber

SIZE = (800, 500)
_seq = itertools.count(1000)


def _offscreen_or_skip() -> None:
    try:
        use_app(offscreen=True)
    except RuntimeError as exc:
        pytest.skip(f"no offscreen OpenGL (vispy egl backend with Mesa's libEGL): {exc}")


@pytest.fixture(scope="module")
def live():
    """One canvas for the module (each new GL context recompiles every shader, ~3 s)."""
    _offscreen_or_skip()
    clock = {"now": 0.0}
    view = LiveView(ViewModel(stale_s=2.0, clock=lambda: clock["now"]), size=SIZE)
    yield view, clock
    view.close()


def _crop(rgba: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = rect
    return rgba[y:y + h, x:x + w, :3].astype(np.int16)


def _hex(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], np.int16)


def _near(pixels: np.ndarray, color: str, tol: int = 40) -> np.ndarray:
    return np.all(np.abs(pixels - _hex(color)) <= tol, axis=-1)


def _png_size(path) -> tuple[int, int]:
    """``(height, width)`` from a PNG's IHDR chunk (reading pixels would need Pillow)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def _grey_text(pixels: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Pixels of neutral grey text with brightness in [lo, hi] (antialiased glyph cores)."""
    spread = pixels.max(axis=-1) - pixels.min(axis=-1)
    level = pixels.max(axis=-1)
    return (spread <= 12) & (level >= lo) & (level <= hi)


def _show(view: LiveView, **kwargs) -> np.ndarray:
    view.show_preview(preview_message(next(_seq), **kwargs))
    return view.render()


def test_layout_fills_the_canvas_with_the_panels(live):
    view, _ = live
    rgba = _show(view)
    assert rgba.shape == (SIZE[1], SIZE[0], 4) and rgba.dtype == np.uint8
    rects = view.panel_rects()
    assert set(rects) == {"image", "psd", "focus", "resolution", "beam", "vibration", "status"}
    for name, (x, y, w, h) in rects.items():
        assert 0 <= x and 0 <= y and x + w <= SIZE[0] and y + h <= SIZE[1], name
        assert w > 50 and h > 15, name
    img, psd, status = rects["image"], rects["psd"], rects["status"]
    assert img[2] > psd[2]  # the image gets the wide column
    assert status[1] > img[1] + img[3] - 1  # status bar below everything


def test_image_region_is_drawn_and_follows_the_input(live):
    view, _ = live
    star = star_image((128, 128), seed=1)
    a = _crop(_show(view, image=star), view.panel_rects()["image"])
    assert a.std() > 30  # spokes and background, not a flat fill
    b = _crop(_show(view, image=star_image((128, 128), seed=1, n_spokes=7)),
              view.panel_rects()["image"])
    assert np.abs(a - b).mean() > 10
    # grey colormap, auto contrast: the bright background reaches near white
    assert np.percentile(a, 99) > 200


def test_image_is_updated_in_place(live):
    view, _ = live
    _show(view)
    image_visual, texture = view.image, view.image._texture
    _show(view, image=star_image((128, 128), seed=5))
    assert view.image is image_visual and view.image._texture is texture
    lo, hi = view.image.clim
    assert (lo, hi) == pytest.approx(view.model.contrast())


def test_psd_panel_draws_curve_floor_and_cutoff_where_they_belong(live):
    view, _ = live
    rgba = _show(view)
    rect = view.panel_rects()["psd"]
    psd = _crop(rgba, rect)
    curve = _near(psd, PSD_COLOR)
    assert curve.sum() > 100
    cols = np.nonzero(curve.any(axis=0))[0]
    assert cols.max() - cols.min() > 0.8 * rect[2]  # the curve spans the frequency axis
    # cut-off: a vertical line in its colour at the cut-off frequency's column
    cutoff = view.model.psd().cutoff_per_um
    cam = view.psd_view.camera.rect
    expect_col = (cutoff - cam.left) / cam.width * rect[2]
    cut = _near(psd, CUTOFF_COLOR, tol=30)
    col = int(np.argmax(cut.sum(axis=0)))
    assert abs(col - expect_col) <= 2 and cut[:, col].sum() > 0.5 * rect[3]
    # noise floor: a horizontal line across the panel in its colour
    floor = _near(psd, FLOOR_COLOR, tol=30)
    assert floor.sum(axis=1).max() > 0.8 * rect[2]
    assert view.resolution_text.visible and "nm (resolved)" in view.resolution_text.text


def test_psd_log_linear_toggle_and_no_psd_note(live):
    view, _ = live
    _show(view)
    log_rect = view.psd_view.camera.rect
    view.handle_key("l")
    assert not view.psd_log
    lin_rect = view.psd_view.camera.rect
    # log10 of 1e-3 … 1, then the power itself (0 … 1)
    assert log_rect.bottom < -2.5 and lin_rect.bottom > -0.2 and lin_rect.top > 1.0
    view.handle_key("l")
    assert view.psd_log
    rgba = _show(view, with_psd=False)
    psd = _crop(rgba, view.panel_rects()["psd"])
    assert not _near(psd, PSD_COLOR, tol=20).any()
    assert view.no_psd_text.visible and _grey_text(psd, 60, _hex(STALE_TEXT).max()).sum() > 20


def test_status_bar_has_text_that_greys_out_when_stale(live):
    view, clock = live
    rgba = _show(view, counters={"dropped": 4})
    status = _crop(rgba, view.panel_rects()["status"])
    assert status.max() == _hex(TEXT).max()  # the text colour itself, at glyph cores
    assert _grey_text(status, 150, 255).sum() > 200
    assert view.status_text.text.startswith(f"seq {view.model.message['seq']}  |")
    assert "dropped 4" in view.status_text.text
    clock["now"] += 5.0
    stale = _crop(view.render(), view.panel_rects()["status"])
    clock["now"] -= 5.0
    assert view.status_text.text.endswith("STALE 5.0 s")
    assert stale.max() == _hex(STALE_TEXT).max()  # greyed out: nothing brighter is left
    assert _grey_text(stale, 60, _hex(STALE_TEXT).max()).sum() > 200


def test_keys_contrast_pause_snapshot(live, tmp_path):
    view, _ = live
    _show(view)
    default = view.model.clip_pct
    view.handle_key("]")
    assert view.model.clip_pct != default
    assert view.image.clim == pytest.approx(view.model.contrast())
    view.handle_key("c")
    assert view.model.clip_pct == default
    view.handle_key(" ")
    assert view.paused and "PAUSED" in view.status_text.text
    view.handle_key("Space")
    assert not view.paused
    view.snapshot_dir = tmp_path
    view.handle_key("s")
    (png,) = tmp_path.glob("txmlive-view-*.png")
    assert _png_size(png) == (SIZE[1], SIZE[0])


def test_render_previews_writes_a_png_of_the_requested_size(tmp_path):
    _offscreen_or_skip()
    path = tmp_path / "view.png"
    rgba = render_previews(preview_sequence(10), path, size=(640, 400))
    assert rgba.shape == (400, 640, 4)
    assert _png_size(path) == (400, 640)
    assert rgba[..., :3].std() > 20


# -- subscriber and the live stream -----------------------------------------------------------
def _pub() -> tuple[zmq.Socket, str]:
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def test_subscriber_keeps_only_the_newest_preview():
    pub, url = _pub()
    small = {"shape": (16, 16), "bin_factor": 1}
    with PreviewSubscriber(url) as sub:
        hello = encode_message(preview_message(-1, **small))
        deadline = time.monotonic() + 10.0
        while sub.poll() is None:  # wait until the subscription has reached the PUB
            assert time.monotonic() < deadline, "subscriber never connected"
            pub.send(hello)
            time.sleep(0.02)
        for seq in range(100):
            pub.send(encode_message(preview_message(seq, **small)))
        time.sleep(0.5)  # the subscriber is busy elsewhere; all 100 have arrived meanwhile
        newest = sub.poll()
        assert newest is not None and newest["seq"] == 99
        assert sub.poll() is None
        pub.send(b"\xc1 not msgpack")
        time.sleep(0.2)
        assert sub.poll() is None and sub.rejected == 1
    pub.close()
    with pytest.raises(ValueError, match="ZMQ endpoint"):
        PreviewSubscriber("localhost:5557")


def test_run_viewer_snapshot_from_a_live_stream(tmp_path):
    _offscreen_or_skip()
    pub, url = _pub()
    stop = threading.Event()

    def publish() -> None:
        for seq in itertools.count():
            if stop.wait(0.05):
                break
            pub.send(encode_message(preview_message(seq, seed=seq)))

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        path = tmp_path / "snap.png"
        assert run_viewer(url, snapshot=str(path), frames=3, size=(640, 400),
                          timeout_s=30.0) == 0
        assert _png_size(path) == (400, 640)
    finally:
        stop.set()
        thread.join(5.0)
        pub.close()


def test_run_viewer_snapshot_times_out_without_a_stream(tmp_path, capsys):
    _offscreen_or_skip()
    pub, url = _pub()  # bound, never sends
    path = tmp_path / "empty.png"
    assert run_viewer(url, snapshot=str(path), frames=2, size=(400, 300), timeout_s=0.3) == 1
    assert path.exists()
    assert "got 0 of 2 previews" in capsys.readouterr().err
    with pytest.raises(ValueError, match="frames"):
        run_viewer(url, snapshot=str(path), frames=0)
    pub.close()


def test_run_viewer_window_loop_polls_on_its_timer_until_frames(tmp_path):
    """The interactive path (timer → poll → draw → quit), run on the egl app instead of Qt."""
    _offscreen_or_skip()
    pub, url = _pub()
    stop = threading.Event()

    def publish() -> None:
        for seq in itertools.count():
            if stop.wait(0.05):
                break
            pub.send(encode_message(preview_message(seq, seed=seq)))

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        assert run_viewer(url, frames=2, size=(400, 300), rate_hz=50.0, app="egl") == 0
    finally:
        stop.set()
        thread.join(5.0)
        pub.close()


def test_a_paused_viewer_costs_the_pipeline_nothing():
    """A subscriber that never polls (paused viewer) while the pipeline streams previews of
    every frame: every result is still sent, none dropped, and the viewer then holds only one
    preview."""
    from stream.frame import Frame
    from stream.pipeline import Pipeline
    from stream.publish import Publisher
    from stream.source import MemorySource
    from txmlive.config import Config
    from txmlive.ports import free_tcp_url

    config = Config()
    config.preview.bin = 1
    config.preview.max_rate_hz = 1e6  # a preview for every frame the buffers allow
    config.correction.enabled = False
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 4000, (256, 256)).astype(np.uint16) for _ in range(4)]
    n = 300
    frames = [Frame(seq=i, t_ns=i, kind="data", image=images[i % 4], exposure_s=0.01,
                    energy_ev=8000.0) for i in range(n)]
    url = free_tcp_url()
    publisher = Publisher(None, url)
    with PreviewSubscriber(url) as sub:
        time.sleep(0.3)  # let the SUB connect, so the previews really queue towards it
        summary = Pipeline(MemorySource(frames), publisher, config).run()
        counters = summary["counters"]
        assert counters["processed"] == n and counters["dropped"] == 0
        assert counters["results_dropped"] == 0
        assert publisher.counters["results_sent"] == n
        assert publisher.counters["previews_sent"] > 10
        time.sleep(0.2)
        newest = sub.poll()
        assert newest is not None and newest["shape"] == [256, 256]
        assert sub.poll() is None and sub.received == 1
