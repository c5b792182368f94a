"""The live vispy viewer: image, radial PSD, time traces and a status bar in one canvas.

Layout (one :class:`vispy.scene.SceneCanvas`, one grid)::

    ┌──────────────────────────┬────────────────────────┐
    │ image (zoom/pan),        │ radial PSD (log10),    │
    │ auto contrast, scale     │ floor, cut-off, res.   │
    │ bar, metrics ROI,        ├────────────────────────┤
    │ beam centroid (+) and    │ focus score trace      │
    │ setpoint (o)             │ resolution trace       │
    │                          │ beam x/y error traces  │
    │                          │ vibration RMS trace    │
    ├──────────────────────────┴────────────────────────┤
    │ seq, fps, latency, counters, loops, PAUSED/STALE  │
    └───────────────────────────────────────────────────┘

Every visual is created once; a new preview updates them in place (``Image.set_data`` on the
same texture, ``clim`` as a uniform, ``Line.set_data``). :func:`run_viewer` polls a
:class:`~viewers.subscriber.PreviewSubscriber` from a timer, so the render rate is independent
of the frame rate; with ``snapshot`` it renders offscreen (vispy ``egl`` backend,
``EGL_PLATFORM=surfaceless``) and writes a PNG. :func:`render_previews` renders a given list
of decoded previews, for tests and documentation.

Keys: ``c`` contrast reset, ``[``/``]`` less/more contrast, ``r`` reset zoom, space
pause/resume, ``l`` log/linear PSD, ``s`` save a snapshot PNG.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from viewers.model import TRACE_NAMES, ViewModel

log = logging.getLogger(__name__)

OFFSCREEN_APP = "egl"
WINDOW_APP = "pyside6"

BG = "#000000"
PANEL_BG = "#111418"
STATUS_BG = "#1c1f24"
TEXT = "#e6e6e6"
STALE_TEXT = "#7a7a7a"
PAUSED_TEXT = "#ffd54f"
PSD_COLOR = "#4fc3f7"
FLOOR_COLOR = "#ffa726"
CUTOFF_COLOR = "#ef5350"
ROI_COLOR = "#ffee58"
CENTROID_COLOR = "#ff7043"
SETPOINT_COLOR = "#26c6da"
TRACE_COLORS = {
    "focus": "#9ccc65", "resolution_nm": "#4fc3f7", "beam_x_err_px": "#ef5350",
    "beam_y_err_px": "#66bb6a", "vibration_nm": "#ba68c8",
}
TRACE_PANELS = (
    ("focus", ("focus",)),
    ("resolution", ("resolution_nm",)),
    ("beam", ("beam_x_err_px", "beam_y_err_px")),
    ("vibration", ("vibration_nm",)),
)


def use_app(offscreen: bool, app: str | None = None) -> Any:
    """Select the vispy application backend before any canvas exists.

    Parameters
    ----------
    offscreen : bool
        True: the ``egl`` backend with ``EGL_PLATFORM=surfaceless`` (unless already set in the
        environment), which needs no display. False: ``app`` or the Qt backend.
    app : str, optional
        vispy backend name overriding the choice above.

    Returns
    -------
    vispy.app.Application

    Raises
    ------
    RuntimeError
        When the backend cannot be loaded, naming what is missing.
    """
    name = app or (OFFSCREEN_APP if offscreen else WINDOW_APP)
    if name == OFFSCREEN_APP:
        # Mesa reads EGL_PLATFORM when vispy's egl backend first opens the display.
        os.environ.setdefault("EGL_PLATFORM", "surfaceless")
    import vispy.app

    try:
        return vispy.app.use_app(name)
    except Exception as exc:  # vispy raises RuntimeError or ImportError, per backend
        hint = ("install the 'gui' extra (PySide6) or use a snapshot" if name == WINDOW_APP
                else "needs libEGL (Mesa) on the machine")
        raise RuntimeError(f"vispy backend {name!r} is not usable ({exc}); {hint}") from exc


def _connect_mask(ok: np.ndarray) -> np.ndarray:
    """``Line`` connect array: segment i → i+1 is drawn only when both ends are ``ok``."""
    return ok & np.append(ok[1:], False)


def _range(lo: float, hi: float, margin: float = 0.05) -> tuple[float, float]:
    """``(lo, hi)`` widened by ``margin`` of the span; a constant gets ±5 % (±1 at zero)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0
    span = hi - lo
    if span <= 0:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    return lo - margin * span, hi + margin * span


def _set_rect(camera: Any, x: tuple[float, float], y: tuple[float, float]) -> None:
    """Show exactly ``x × y`` (``set_range`` adds an absolute 0.1 when its margin is 0)."""
    camera.rect = (x[0], y[0], x[1] - x[0], y[1] - y[0])


def _fmt_value(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return f"{text} {unit}".rstrip()


class LiveView:
    """The canvas and its visuals, drawn from a :class:`~viewers.model.ViewModel`.

    Call :func:`use_app` before constructing one.

    Parameters
    ----------
    model : ViewModel, optional
        Defaults to a fresh one.
    size : tuple of int
        Canvas ``(width, height)``, px.
    cmap : str
        vispy colormap of the image.
    show : bool
        Open a window (False for offscreen rendering).
    snapshot_dir : str or Path
        Where the ``s`` key writes its PNGs.
    """

    def __init__(self, model: ViewModel | None = None, *, size: tuple[int, int] = (1280, 800),
                 cmap: str = "grays", show: bool = False, snapshot_dir: str | Path = "."):
        from vispy import scene
        from vispy.visuals.text.text import FontManager

        if len(size) != 2 or min(size) < 200:
            raise ValueError(f"size must be (width, height) with both >= 200 px, got {size}")
        self.model = model if model is not None else ViewModel()
        self.paused = False
        self.psd_log = True
        self.snapshot_dir = Path(snapshot_dir)
        self._image_shape: tuple[int, int] | None = None
        self._axes: list[Any] = []
        self._laid_out = False
        # One glyph atlas for all texts of this canvas: vispy gives every Text its own by
        # default, and rendering the same glyphs again for each costs seconds on the CPU.
        self._fonts = FontManager()
        self._scene = scene
        self.canvas = scene.SceneCanvas(title="txmlive view", size=tuple(size), bgcolor=BG,
                                        keys="interactive", show=show)
        self.canvas.events.key_press.connect(self._on_key)
        grid = self.canvas.central_widget.add_grid(spacing=4, margin=4)
        self._build_image(grid, cmap)
        self._build_psd(grid)
        self._build_traces(grid)
        self._build_status(grid)
        self.refresh()

    # -- construction -----------------------------------------------------------------------
    def _panel(self, grid: Any, row: int, col: int, title: str, *, height_stretch: float = 1,
               x_axis: bool = False, y_axis: bool = True) -> tuple[Any, Any]:
        """A titled sub-grid with a view (and axes); returns ``(view, title_text)``."""
        scene = self._scene
        sub = grid.add_grid(row=row, col=col, spacing=0, bgcolor=PANEL_BG)
        sub.stretch = (2, height_stretch)
        _, label = self._text_bar(sub, 0, 0, title, col_span=2)
        view = sub.add_view(row=1, col=1, bgcolor=PANEL_BG)
        view.camera = scene.PanZoomCamera(interactive=False)
        if y_axis:
            axis = scene.AxisWidget(orientation="left", text_color=TEXT, axis_color=TEXT,
                                    tick_color=TEXT, tick_font_size=6, axis_font_size=6)
            axis.width_max = 48
            sub.add_widget(axis, row=1, col=0)
            axis.link_view(view)
            self._add_axis(axis)
        if x_axis:
            axis = scene.AxisWidget(orientation="bottom", text_color=TEXT, axis_color=TEXT,
                                    tick_color=TEXT, tick_font_size=6, axis_font_size=6)
            axis.height_max = 22
            sub.add_widget(axis, row=2, col=1)
            axis.link_view(view)
            self._add_axis(axis)
        return view, label

    def _text_bar(self, grid: Any, row: int, col: int, text: str, *, col_span: int = 1,
                  height_px: int = 18, font_size: float = 8, bgcolor: str = PANEL_BG
                  ) -> tuple[Any, Any]:
        """A one-line, left-aligned, clipped text row; returns ``(view, text_visual)``."""
        scene = self._scene
        view = grid.add_view(row=row, col=col, col_span=col_span, bgcolor=bgcolor)
        view.height_max = height_px
        view.camera = scene.PanZoomCamera(interactive=False)
        _set_rect(view.camera, (-0.005, 1.0), (0.0, 1.0))
        visual = scene.visuals.Text(text, color=TEXT, font_size=font_size, anchor_x="left",
                                    pos=(0.0, 0.5), parent=view.scene, font_manager=self._fonts)
        return view, visual

    def _add_axis(self, axis: Any) -> None:
        # AxisVisual makes its texts without a font_manager parameter; hand them the shared
        # one (setting ``face`` reloads the font from it).
        for text in (axis.axis._text, axis.axis._axis_label_vis):
            text._font_manager = self._fonts
            text.face = text.face
        self._axes.append(axis)

    def _build_image(self, grid: Any, cmap: str) -> None:
        scene = self._scene
        sub = grid.add_grid(row=0, col=0, row_span=1 + len(TRACE_PANELS), spacing=0,
                            bgcolor=PANEL_BG)
        _, self.image_title = self._text_bar(sub, 0, 0, "image")
        self.image_view = sub.add_view(row=1, col=0, bgcolor=PANEL_BG)
        # Row 0 at the top, as the detector and every image tool show it.
        self.image_view.camera = scene.PanZoomCamera(aspect=1, flip=(False, True))
        # texture_format="auto" keeps the data on the GPU as float and applies clim in the
        # shader: a contrast change costs a uniform, not a re-upload.
        self.image = scene.visuals.Image(np.zeros((2, 2), np.float32), cmap=cmap, clim=(0, 1),
                                         interpolation="nearest", texture_format="auto",
                                         parent=self.image_view.scene)
        self.scale_box = scene.visuals.Rectangle(center=(1, 1), width=1, height=1,
                                                 color=(0, 0, 0, 0.65),
                                                 parent=self.image_view.scene)
        self.roi_line = scene.visuals.Line(np.zeros((5, 2), np.float32), color=ROI_COLOR,
                                           width=1.5, parent=self.image_view.scene)
        self.markers = scene.visuals.Markers(pos=np.zeros((1, 2), np.float32),
                                             parent=self.image_view.scene, scaling=False)
        self.scale_line = scene.visuals.Line(np.zeros((2, 2), np.float32), color="white",
                                             width=4, parent=self.image_view.scene)
        # vispy's anchor_y names the side of the text away from pos: "top" puts it above.
        self.scale_text = scene.visuals.Text("", color="white", font_size=10, anchor_x="left",
                                             anchor_y="top", parent=self.image_view.scene,
                                             font_manager=self._fonts)
        # Overlays are drawn after the image; without depth testing they are never hidden by
        # it (all lie in the z = 0 plane).
        self.image.set_gl_state("translucent", depth_test=False)
        for order, visual in enumerate((self.roi_line, self.markers, self.scale_box,
                                        self.scale_line, self.scale_text), start=1):
            visual.order = order
            visual.set_gl_state("translucent", depth_test=False)
            visual.visible = False
        _set_rect(self.image_view.camera, (0, 2), (0, 2))
        sub.stretch = (3, 1)

    def _build_psd(self, grid: Any) -> None:
        from vispy.color import Color

        scene = self._scene
        self.psd_view, self.psd_title = self._panel(grid, 0, 1, "radial PSD", height_stretch=2,
                                                    x_axis=True)
        parent = self.psd_view.scene
        self.psd_line = scene.visuals.Line(np.zeros((2, 2), np.float32), color=PSD_COLOR,
                                           width=2, parent=parent)
        self.floor_line = scene.visuals.InfiniteLine(0.0, color=Color(FLOOR_COLOR).rgba,
                                                     vertical=False, parent=parent)
        self.cutoff_line = scene.visuals.InfiniteLine(0.0, color=Color(CUTOFF_COLOR).rgba,
                                                      vertical=True, parent=parent)
        self.resolution_text = scene.visuals.Text("", color=CUTOFF_COLOR, font_size=9,
                                                  anchor_x="left", anchor_y="bottom",
                                                  parent=parent, font_manager=self._fonts)
        self.no_psd_text = scene.visuals.Text("no PSD", color=STALE_TEXT, font_size=10,
                                              pos=(0.5, 0.5), parent=parent,
                                              font_manager=self._fonts)
        _set_rect(self.psd_view.camera, (0, 1), (0, 1))

    def _build_traces(self, grid: Any) -> None:
        scene = self._scene
        self.trace_views: dict[str, Any] = {}
        self.trace_titles: dict[str, Any] = {}
        self.trace_lines: dict[str, Any] = {}
        for i, (panel, names) in enumerate(TRACE_PANELS):
            # Only the bottom panel carries the shared time axis (s before the newest preview).
            view, title = self._panel(grid, 1 + i, 1, panel,
                                      x_axis=i == len(TRACE_PANELS) - 1)
            self.trace_views[panel], self.trace_titles[panel] = view, title
            for name in names:
                self.trace_lines[name] = scene.visuals.Line(
                    np.zeros((2, 2), np.float32), color=TRACE_COLORS[name], width=1.5,
                    parent=view.scene)
                self.trace_lines[name].visible = False
            _set_rect(view.camera, (-1, 0), (0, 1))

    def _build_status(self, grid: Any) -> None:
        self.status_view, self.status_text = self._text_bar(
            grid, 1 + len(TRACE_PANELS), 0, "", col_span=2, height_px=26, font_size=9,
            bgcolor=STATUS_BG)

    # -- updates ----------------------------------------------------------------------------
    def show_preview(self, message: dict[str, Any]) -> bool:
        """Feed a decoded preview to the model and redraw what it changes.

        Returns False (nothing redrawn) for a repeated ``seq``.
        """
        if not self.model.update(message):
            return False
        self._draw_image()
        self._draw_overlays()
        self._draw_psd()
        self._draw_traces()
        self.refresh()
        return True

    def _draw_image(self) -> None:
        data = np.asarray(self.model.image, dtype=np.float32)
        self.image.set_data(data)  # same shape: same texture, sub-image upload
        if self._image_shape != data.shape:
            self._image_shape = data.shape
            self.reset_zoom()
        self._draw_contrast()

    def _draw_contrast(self) -> None:
        model = self.model
        lo, hi = self.image.clim = model.contrast()
        low_pct, high_pct = model.clip_pct
        rows, cols = model.image.shape
        self.image_title.text = (f"image {cols}×{rows} (bin {model.bin_factor})"
                                 f"   contrast {lo:.4g}–{hi:.4g} ({low_pct:g}–{high_pct:g} %)")

    def reset_zoom(self) -> None:
        if self._image_shape is not None:
            rows, cols = self._image_shape
            pad = 0.02 * max(rows, cols)
            _set_rect(self.image_view.camera, (-pad, cols + pad), (-pad, rows + pad))

    def _draw_overlays(self) -> None:
        model = self.model
        roi = model.roi_rect()
        if roi is not None:
            x0, y0, x1, y1 = roi
            self.roi_line.set_data(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]],
                                            np.float32))
        self.roi_line.visible = roi is not None
        points, symbols, colors = [], [], []
        for pos, symbol, color in ((model.setpoint(), "disc", SETPOINT_COLOR),
                                   (model.centroid(), "cross", CENTROID_COLOR)):
            if pos is not None:
                points.append(pos)
                symbols.append(symbol)
                colors.append(color)
        if points:
            self.markers.set_data(np.array(points, np.float32), symbol=symbols, size=22,
                                  edge_width=3, edge_color=colors, face_color=(0, 0, 0, 0))
        self.markers.visible = bool(points)
        bar = model.scale_bar()
        if bar is not None:
            rows, cols = model.image.shape
            x0, y, pad = 0.04 * cols, 0.95 * rows, 0.015 * cols
            self.scale_line.set_data(np.array([[x0, y], [x0 + bar.length_px, y]], np.float32))
            self.scale_text.text = bar.label
            self.scale_text.pos = (x0, y - 0.02 * rows)
            # Dark box behind bar and label so both read on any image.
            box_w = max(bar.length_px, 0.12 * cols) + 2 * pad
            box_h = 0.09 * rows
            self.scale_box.center = (x0 - pad + 0.5 * box_w, y + pad - 0.5 * box_h)
            self.scale_box.width, self.scale_box.height = box_w, box_h
        for visual in (self.scale_line, self.scale_box, self.scale_text):
            visual.visible = bar is not None

    def _draw_psd(self) -> None:
        curve = self.model.psd()
        visuals = (self.psd_line, self.floor_line, self.cutoff_line, self.resolution_text)
        self.no_psd_text.visible = curve is None
        if curve is None:
            for visual in visuals:
                visual.visible = False
            self.psd_title.text = "radial PSD"
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(curve.psd > 0, np.log10(curve.psd), np.nan) if self.psd_log else curve.psd
            floor = curve.floor
            if floor is not None and self.psd_log:
                floor = math.log10(floor) if floor > 0 else None
        x = curve.freqs_per_um
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 2:
            for visual in visuals:
                visual.visible = False
            self.no_psd_text.visible = True
            return
        pos = np.column_stack([np.where(ok, x, 0.0), np.where(ok, y, 0.0)]).astype(np.float32)
        self.psd_line.set_data(pos, connect=_connect_mask(ok))
        self.psd_line.visible = True
        x_lo, x_hi = _range(float(x[ok].min()), float(x[ok].max()), 0.02)
        y_vals = y[ok] if floor is None else np.append(y[ok], floor)
        y_lo, y_hi = _range(float(y_vals.min()), float(y_vals.max()))
        y_hi += 0.2 * (y_hi - y_lo)  # headroom for the resolution text
        _set_rect(self.psd_view.camera, (x_lo, x_hi), (y_lo, y_hi))
        self.floor_line.visible = floor is not None
        if floor is not None:
            self.floor_line.set_data(floor)
        cutoff = curve.cutoff_per_um
        self.cutoff_line.visible = cutoff is not None
        if cutoff is not None:
            self.cutoff_line.set_data(cutoff)
        text_x = cutoff if cutoff is not None else x_lo + 0.55 * (x_hi - x_lo)
        self.resolution_text.text = f" {curve.label}"
        self.resolution_text.pos = (text_x, y_hi - 0.03 * (y_hi - y_lo))
        self.resolution_text.visible = True
        scale = "log10" if self.psd_log else "linear"
        cut = f"   f_c {cutoff:.3g} 1/µm" if cutoff is not None else ""
        self.psd_title.text = f"radial PSD ({scale}) vs 1/µm{cut}"

    def _draw_traces(self) -> None:
        traces = self.model.traces
        t_now = traces[TRACE_NAMES[0]].t_s[-1]
        for panel, names in TRACE_PANELS:
            lows, highs = [], []
            for name in names:
                t, v = traces[name].arrays()
                t -= t_now  # in float64: epoch seconds in float32 would lose whole minutes
                ok = np.isfinite(v)
                line = self.trace_lines[name]
                line.visible = ok.sum() >= 2
                if line.visible:
                    pos = np.column_stack([t, np.where(ok, v, 0.0)]).astype(np.float32)
                    line.set_data(pos, connect=_connect_mask(ok))
                    lows.append(v[ok].min())
                    highs.append(v[ok].max())
            # t is the same for every trace; a time step back (new series) widens the range
            x_range = (float(t.min()), float(t.max())) if t.max() > t.min() else (-1.0, 0.0)
            y_range = _range(min(lows), max(highs)) if lows else (0.0, 1.0)
            _set_rect(self.trace_views[panel].camera, x_range, y_range)
            self.trace_titles[panel].text = self._trace_title(panel)

    def _trace_title(self, panel: str) -> str:
        traces = self.model.traces
        if panel == "focus":
            return f"focus ({self.model.focus_key}) {_fmt_value(traces['focus'].latest)}"
        if panel == "resolution":
            return f"resolution {_fmt_value(traces['resolution_nm'].latest, 'nm')}"
        if panel == "beam":
            x, y = traces["beam_x_err_px"].latest, traces["beam_y_err_px"].latest
            return f"beam error px: x {_fmt_value(x)} (red)  y {_fmt_value(y)} (green)"
        return (f"vibration RMS {_fmt_value(traces['vibration_nm'].latest, 'nm')}"
                "   (time: s before the newest preview)")

    def refresh(self) -> None:
        """Redraw the status bar (age, staleness) and axes; request a repaint."""
        model = self.model
        self.status_text.text = model.status_text(self.paused)
        if self.paused:
            color = PAUSED_TEXT
        elif model.is_stale():
            color = STALE_TEXT
        else:
            color = TEXT
        self.status_text.color = color
        self._sync_axes()
        self.canvas.update()

    def _sync_axes(self) -> None:
        # Axes follow their view's camera only when it moves; re-read it so a layout change
        # (first draw, resize) is reflected too.
        for axis in self._axes:
            axis._view_changed()

    # -- keys and output --------------------------------------------------------------------
    def _on_key(self, event: Any) -> None:
        name = event.text if event.text else (event.key.name if event.key else "")
        self.handle_key(name)

    def handle_key(self, key: str) -> None:
        """Act on one key: ``c``, ``[``, ``]``, ``r``, ``l``, ``s``, space (``" "``/``Space``)."""
        if key == "c":
            self.model.reset_contrast()
        elif key == "[":
            self.model.scale_clip(0.5)
        elif key == "]":
            self.model.scale_clip(2.0)
        elif key == "r":
            self.reset_zoom()
        elif key in (" ", "Space"):
            self.paused = not self.paused
        elif key == "l":
            self.psd_log = not self.psd_log
            if self.model.message is not None:
                self._draw_psd()
        elif key == "s":
            seq = self.model.message["seq"] if self.model.message is not None else "none"
            path = self.save_png(self.snapshot_dir / f"txmlive-view-{seq}.png")
            log.info("snapshot written to %s", path)
        if key in ("c", "[", "]") and self.model.image is not None:
            self._draw_contrast()
        self.refresh()

    def render(self, refresh_status: bool = True) -> np.ndarray:
        """The canvas as an RGBA array, shape (height, width, 4), uint8.

        ``refresh_status=False`` keeps the status bar as of the last :meth:`refresh` (a
        snapshot shows the age when the last preview was drawn, not after the first render's
        shader compilation).
        """
        if not self._laid_out:  # the grid is laid out during the first draw
            self.canvas.render()
            self._laid_out = True
        if refresh_status:
            self.refresh()
        self._sync_axes()
        return self.canvas.render()

    def save_png(self, path: str | Path, refresh_status: bool = True) -> Path:
        """Render (see :meth:`render`) and write a PNG; returns its path."""
        from vispy.io import write_png

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(str(path), self.render(refresh_status))
        return path

    def panel_rects(self) -> dict[str, tuple[int, int, int, int]]:
        """``{panel: (x, y, width, height)}`` of each view in rendered pixels (y from the top).

        Panels: ``image``, ``psd``, ``status`` and the trace panels (``focus``, ``resolution``,
        ``beam``, ``vibration``).
        """
        views = {"image": self.image_view, "psd": self.psd_view, "status": self.status_view,
                 **self.trace_views}
        rects = {}
        for name, view in views.items():
            corners = np.array([[0, 0], [view.size[0], view.size[1]]], np.float64)
            (x0, y0), (x1, y1) = view.get_transform("visual", "canvas").map(corners)[:, :2]
            rects[name] = (int(round(x0)), int(round(y0)), int(round(x1 - x0)),
                           int(round(y1 - y0)))
        return rects

    def close(self) -> None:
        self.canvas.close()


def render_previews(messages: Iterable[dict[str, Any]], path: str | Path | None = None, *,
                    size: tuple[int, int] = (1280, 800), cmap: str = "grays",
                    stale_s: float = 2.0, age_s: float = 0.0) -> np.ndarray:
    """Render decoded previews offscreen, as the live viewer would after receiving them.

    Parameters
    ----------
    messages : iterable of dict
        Decoded preview messages (:func:`stream.publish.decode_message`), oldest first; all
        of them feed the traces, the last one is the image.
    path : str or Path, optional
        Also write the render as a PNG here.
    size : tuple of int
        ``(width, height)``, px.
    cmap : str
        Image colormap.
    stale_s : float
        Staleness threshold of the status bar, s.
    age_s : float
        Show the view this long after the last preview arrived (> ``stale_s``: stale).

    Returns
    -------
    ndarray of uint8, shape (height, width, 4)
    """
    use_app(offscreen=True)
    now = [0.0]  # a clock that stands still while rendering: the age is exactly age_s
    model = ViewModel(stale_s=stale_s, clock=lambda: now[0])
    view = LiveView(model, size=size, cmap=cmap)
    try:
        for message in messages:
            view.show_preview(message)
        now[0] = age_s
        image = view.render()
    finally:
        view.close()
    if path is not None:
        from vispy.io import write_png

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_png(str(path), image)
    return image


def run_viewer(connect: str, *, snapshot: str | None = None, frames: int | None = None,
               size: tuple[int, int] = (1280, 800), stale_s: float = 2.0, rate_hz: float = 20.0,
               timeout_s: float = 30.0, cmap: str = "grays", app: str | None = None) -> int:
    """Subscribe to the preview stream and show it; the entry point of ``txmlive view``.

    Parameters
    ----------
    connect : str
        Preview PUB endpoint, e.g. ``"tcp://127.0.0.1:5557"``.
    snapshot : str, optional
        Render offscreen after ``frames`` previews, write this PNG and return (no window).
    frames : int, optional
        Previews to receive before the snapshot (default 1) or before closing the window
        (default: run until closed).
    size : tuple of int
        Canvas ``(width, height)``, px.
    stale_s : float
        No preview for this long greys the status bar out, s.
    rate_hz : float
        Polls/redraws per second, independent of the frame rate.
    timeout_s : float
        Snapshot mode: give up after this long without enough previews.
    cmap : str
        Image colormap.
    app : str, optional
        vispy backend (default ``egl`` for snapshots, ``pyside6`` for a window).

    Returns
    -------
    int
        0 on success; 1 when a snapshot timed out (the PNG is still written, showing what
        arrived); 2 when no vispy backend could be loaded.
    """
    from viewers.subscriber import PreviewSubscriber

    if frames is not None and frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not rate_hz > 0:
        raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
    try:
        application = use_app(offscreen=snapshot is not None, app=app)
    except RuntimeError as exc:
        print(f"txmlive view: {exc}", file=sys.stderr)
        return 2
    with PreviewSubscriber(connect) as sub:
        view = LiveView(ViewModel(stale_s=stale_s), size=size, cmap=cmap,
                        show=snapshot is None)
        try:
            if snapshot is not None:
                return _snapshot(view, sub, Path(snapshot), frames or 1, rate_hz, timeout_s)
            _interactive(application, view, sub, frames, rate_hz)
            return 0
        finally:
            view.close()


def _snapshot(view: LiveView, sub: Any, path: Path, frames: int, rate_hz: float,
              timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while view.model.previews < frames and time.monotonic() < deadline:
        message = sub.poll()
        if message is None:
            time.sleep(1.0 / rate_hz)
        else:
            view.show_preview(message)
    view.refresh()
    view.save_png(path, refresh_status=False)
    if view.model.previews < frames:
        print(f"txmlive view: got {view.model.previews} of {frames} previews from "
              f"{sub.connect} in {timeout_s:g} s; wrote {path} anyway", file=sys.stderr)
        return 1
    return 0


def _interactive(application: Any, view: LiveView, sub: Any, frames: int | None,
                 rate_hz: float) -> None:
    import vispy.app

    def tick(_event: Any) -> None:
        # Paused: leave the newest preview waiting in the conflating socket, draw nothing new.
        if not view.paused:
            message = sub.poll()
            if message is not None:
                view.show_preview(message)
                if frames is not None and view.model.previews >= frames:
                    application.quit()
        view.refresh()

    timer = vispy.app.Timer(1.0 / rate_hz, connect=tick, app=application, start=True)
    view.canvas.show()
    application.run()
    timer.stop()
