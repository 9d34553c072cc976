"""The inspector's page (crack-app, docs/app.md): Gradio widgets wired to
inference/inspection.py. Gradio is imported here only, and only when the page is built:
the rest of the package works without the `app` extra.

Nothing leaves the machine: Gradio's analytics and version check are off, no share link is
made, the theme uses the system's fonts, and Gradio's files (uploads, the images it
serves) go under the folder chosen with files_dir (GRADIO_TEMP_DIR), not the current one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import shutil
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crack_lightning.errors import CrackLightningError, PredictionError
from crack_lightning.evaluation.threshold import decision_threshold
from crack_lightning.inference.adaptation import Adapter
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.inspection import (
    HEAT_OPACITY,
    MARK_CHOICES,
    PATCH_COLUMNS,
    SUMMARY_COLUMNS,
    Inspection,
    Inspector,
    downloads,
    figure,
    patch_at,
    patch_rows,
    rethreshold,
    summary_rows,
    verdict,
)

INSTALL = (
    "crack-app needs the `app` extra (Gradio): pip install -e '.[app]' "
    "(or pip install gradio gradio_client)."
)
# the page's fonts: the system's, not Google Fonts (the page works offline)
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
# seconds between updates of the adaptation's line while it runs
ADAPT_POLL_S = 2.0


def gradio() -> Any:
    """The gradio module, imported with its telemetry off; PredictionError with the
    install line when the extra is missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        raise PredictionError(INSTALL) from None
    return gradio


def use_files_dir(files_dir: Path) -> None:
    """Gradio's uploads and cache under files_dir; set before gradio is imported (some
    of its modules read it then)."""
    os.environ["GRADIO_TEMP_DIR"] = str(Path(files_dir).absolute() / "gradio")


@dataclass(eq=False)
class Session:
    """One browser tab's photos (by photo_name, in the order dropped, at most `limit`) and
    its download folder; closed when the tab closes or the session expires."""

    out: Path
    limit: int
    inspections: dict[str, Inspection] = field(default_factory=dict)
    # uploaded files already scanned: a drop onto the list re-sends them all, and a new
    # model scans a photo again only on request (rescan)
    seen: set[str] = field(default_factory=set)
    # the photo the page shows: the newest choice, set as soon as it is made, so that an
    # update finishing later (a new threshold) draws this photo, never the one before
    shown: str | None = None
    # one update of the photos at a time: a view is drawn after the relabelling it waits on
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    opacity: float = HEAT_OPACITY  # the heat map's, on the page's figure

    def current(self, name: str | None) -> Inspection | None:
        return self.inspections.get(name) if name else None

    def keep(self, scanned: Sequence[Inspection]) -> list[str]:
        """Add the scanned photos (one scanned again replaces its row, as the newest);
        the oldest beyond the limit are let go with their files; returns their names."""
        for inspection in scanned:
            self.inspections.pop(inspection.name, None)
            self.inspections[inspection.name] = inspection
        dropped = list(self.inspections)[: max(0, len(self.inspections) - self.limit)]
        for name in dropped:
            for path in downloads([self.inspections.pop(name)], self.out):
                path.unlink(missing_ok=True)
        return dropped

    def close(self) -> None:
        """Free the photos and remove the download folder (the marks stay in labels_dir)."""
        self.inspections.clear()
        self.seen.clear()
        shutil.rmtree(self.out, ignore_errors=True)


def close_session(session: Session | None) -> None:
    """gr.State's delete_callback: a session expired or its tab closed."""
    if session is not None:
        session.close()
        release_memory()


def release_memory() -> None:
    """Hand freed memory back to the system: glibc keeps a closed session's photos (freed
    on the server's threads) in its arenas, so the process would not shrink otherwise."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:  # glibc only
        trim(0)


def model_line(inspector: Inspector) -> str:
    model = inspector.classifier
    stored = "none stored" if model.threshold is None else f"{model.threshold:.3f} stored"
    source = Path(model.source)
    return (
        f"**Model:** `{source.name}` of `{source.parent.parent.name or source.parent}` "
        f"(patches resized to {model.image_size} px; threshold {stored}; its window "
        f"{inspector.window.describe()}) · **marks saved in:** `{inspector.labels_dir}`"
    )


def mark_count(inspector: Inspector, size: int) -> tuple[str, str | None]:
    """The marks the window size's folder holds ("2 Negative, 4 Positive") and, where
    adapting needs more, how many ("adapting needs at least 6 of each: 4 more Negative,
    2 more Positive"; None: enough)."""
    counts = inspector.mark_counts(size)
    have = ", ".join(f"{n} {label}" for label, n in counts.items())
    short = {label: inspector.marks_needed - n for label, n in counts.items()}
    if all(n <= 0 for n in short.values()):
        return have, None
    more = ", ".join(f"{n} more {label}" for label, n in short.items() if n > 0)
    return have, f"adapting needs at least {inspector.marks_needed} of each: {more}"


def marks_line(inspector: Inspector, size: int) -> str:
    """How many marks the window size's folder holds, and how many more adapting needs."""
    folder = inspector.marks_folder(size)
    have, short = mark_count(inspector, size)
    if short is None:
        return f"Marks in `{folder}`: {have}, enough to adapt (data.sources.site.root={folder})."
    return f"Marks in `{folder}`: {have}; {short}."


def adapt_refusal(inspector: Inspector, adapter: Adapter, size: int) -> str | None:
    """Why the page cannot start adapting from the marks of size px windows now, in one
    line; None: it can."""
    if (running := adapter.running()) is not None:
        return f"Not started: an adaptation is running already ({running.out})."
    model = Path(inspector.classifier.source)
    if model.suffix.lower() != ".ckpt":
        return (
            f"Not started: adapting starts from a training checkpoint (.ckpt), and the "
            f"page's model is {model.name}: load the checkpoint it was exported from as "
            f"Another model first."
        )
    have, short = mark_count(inspector, size)
    if short is not None:
        return f"Not started: {inspector.marks_folder(size)} holds {have}; {short}."
    return None


def page_errors(function: Callable) -> Callable:
    """Our errors (a folder that cannot be written, a bad model file) as a message on the
    page; the page itself stays alive."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except CrackLightningError as err:
            raise gradio().Error(str(err)) from None

    return guarded


def build_page(
    inspector: Inspector,
    threshold: float | None,
    files_dir: Path,
    adapter: Adapter,
    device: str = "auto",
    session_photos: int = 20,
    session_minutes: float = 60,
) -> Any:
    """The page as gr.Blocks: drop photos, see each overlay, verdict and patch table,
    move the threshold, mark patches, download the CSV and PNG files, adapt the model
    from the marks in the background (`adapter`). Each tab's session keeps at most
    `session_photos` photos and is freed when the tab closes (unload) or after
    `session_minutes` without use (gr.State's time_to_live)."""
    gr = gradio()
    downloads_root = Path(files_dir) / "downloads"
    start = decision_threshold(threshold, inspector.classifier.threshold)
    # the open sessions by Gradio's session hash, for the tab's unload; gr.State owns them
    open_sessions: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()

    def photo_view(session: Session | None) -> tuple:
        """The overlay, heading and patch table of the photo shown, drawn together from
        one name (the session's), so the heading never names another photo."""
        inspection = session.current(session.shown) if session else None
        if inspection is None:
            return None, "", None
        return (
            figure(inspection, session.opacity),
            heading(inspection),
            gr.update(value=patch_rows(inspection), headers=PATCH_COLUMNS),
        )

    def heading(inspection: Inspection) -> str:
        """The photo's name and verdict; which model scanned it where that is not the
        page's model; the two models' verdicts where their overlays are side by side."""
        text = f"### {inspection.name}: {verdict(inspection.result)}"
        if inspection.model != inspector.classifier.source:
            text += f" (scanned with {inspection.model_name})"
        if (earlier := inspection.earlier) is not None:
            text += (
                f"\n\nLeft: scanned with {earlier.model_name}: {verdict(earlier.result)}. "
                f"Right: scanned with {inspection.model_name}."
            )
        return text

    @page_errors
    def scan(
        files: list[str] | None,
        level: float,
        patch: float | None,
        stride: float | None,
        heat: float | None,
        session: Session | None,
        request: gr.Request,
    ) -> tuple:
        """Scan the photos dropped that the page has not scanned yet."""
        if session is None:
            session = Session(downloads_root / uuid.uuid4().hex, session_photos)
            session.opacity = HEAT_OPACITY if heat is None else float(heat)
            if request is not None and request.session_hash:
                open_sessions[request.session_hash] = session
        files = [f for f in files or [] if f not in session.seen]
        window = (int(patch), int(stride)) if patch and stride else None
        scanned, refused = inspector.scan([Path(f) for f in files], level, session.out, window)
        with session.lock:
            session.seen.update(files)
            dropped = session.keep(scanned)
            scanned = [i for i in scanned if i.name in session.inspections]
            names = list(session.inspections)
            if scanned:
                session.shown = scanned[0].name
            elif session.shown not in session.inspections:
                session.shown = names[-1] if names else None
            view = photo_view(session)
            files_out = downloads(list(session.inspections.values()), session.out)
            rows = summary_rows(session.inspections.values())
        for name, reason in refused:
            gr.Warning(f"{name}: {reason}")
        lines = [f"Scanned {len(scanned)} photo(s)."] if scanned else []
        lines += [f"- skipped **{name}**: {reason}" for name, reason in refused]
        if dropped:
            lines.append(
                f"- the page keeps the last {session.limit} photos (session_photos): "
                f"let go {', '.join(dropped)}"
            )
        if not scanned and files:
            lines.insert(0, "No photo could be scanned.")
        return (
            session,
            gr.update(choices=names, value=session.shown),
            *view,
            rows,
            [str(p) for p in files_out],
            "\n".join(lines),
        )

    @page_errors
    def change_threshold(level: float, name: str | None, session: Session | None) -> tuple:
        """Relabel every photo; the view returned is of the photo shown when it finishes
        (`name`, the choice when the threshold was typed, may be stale by then)."""
        # the session is an output of every event, so that its time to live counts from
        # its last use
        if session is None or not session.inspections:
            return session, None, "", None, None, None
        with session.lock:
            files_out = rethreshold(list(session.inspections.values()), level, session.out)
            return (
                session,
                *photo_view(session),
                summary_rows(session.inspections.values()),
                [str(p) for p in files_out],
            )

    @page_errors
    def rescan(
        level: float, patch: float | None, stride: float | None, session: Session | None
    ) -> tuple:
        """The photo shown scanned again with the page's model (beside the earlier
        model's overlay when another model scanned it)."""
        inspection = session.current(session.shown) if session else None
        if inspection is None:
            return session, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), ""
        window = (int(patch), int(stride)) if patch and stride else None
        new, reason = inspector.rescan(inspection, level, session.out, window)
        if new is None:
            gr.Warning(f"{inspection.name}: {reason}")
            said = f"{inspection.name} could not be scanned again: {reason}"
        else:
            said = f"Scanned {new.name} again with {new.model_name}."
        with session.lock:
            if new is not None:
                session.keep([new])
            files_out = downloads(list(session.inspections.values()), session.out)
            return (
                session,
                *photo_view(session),
                summary_rows(session.inspections.values()),
                [str(p) for p in files_out],
                said,
            )

    @page_errors
    def site_report(level: float, session: Session | None) -> tuple:
        """site_summary.csv and site_report.html (predict mode=scan's, with a crack-map
        model's cracks) for the photos on the page, beside their downloads."""
        if session is None or not session.inspections:
            return session, gr.update(), "Drop a photo first."
        with session.lock:
            inspections = list(session.inspections.values())
            report = inspector.site_report(inspections, level, session.out)
            files_out = downloads(inspections, session.out)
        summary_file, page_file, *tables = report
        cracks = f" and {len(tables)} crack table(s), PHOTO_cracks.csv" if tables else ""
        return (
            session,
            [str(p) for p in [*report, *files_out]],
            f"Site report of {len(inspections)} photo(s), ranked: {summary_file.name}, "
            f"{page_file.name}{cracks} (in Downloads).",
        )

    @page_errors
    def set_opacity(opacity: float, session: Session | None) -> tuple:
        """The figure drawn again at the heat map's new opacity (no scan)."""
        if session is None:
            return session, None, "", None
        session.opacity = float(opacity)
        with session.lock:
            return session, *photo_view(session)

    @page_errors
    def show(name: str | None, session: Session | None) -> tuple:
        if session is None:
            return session, None, "", None
        session.shown = name  # before waiting: an update finishing meanwhile draws this one
        with session.lock:
            return session, *photo_view(session)

    @page_errors
    def mark(
        mark_as: str, name: str | None, session: Session | None, event: gr.SelectData
    ) -> tuple:
        # the photo whose overlay was clicked: the one shown (`name` may lag behind it)
        inspection = session.current(session.shown or name) if session else None
        if inspection is None or not event.index:
            return session, gr.update(), gr.update(), "Drop a photo first."
        index = patch_at(inspection, *event.index[:2])
        if index is None:
            return (
                session,
                gr.update(),
                gr.update(),
                "No patch there (the scan's windows leave it out).",
            )
        crop = inspector.mark(inspection, index, MARK_CHOICES[mark_as])
        x, y = inspection.result.boxes[index]
        said = f"saved {crop}" if crop else "its crop removed"
        return (
            session,
            figure(inspection, session.opacity),
            gr.update(value=patch_rows(inspection), headers=PATCH_COLUMNS),
            f"Patch {index} at x={x}, y={y} of {inspection.name}: {mark_as} ({said}). "
            + marks_line(inspector, inspection.result.patch_size),
        )

    mark.__annotations__["event"] = gr.SelectData  # how Gradio knows to pass the click
    scan.__annotations__["request"] = gr.Request  # and the tab's session hash

    def end_session(request: gr.Request) -> None:
        """The tab closed: its photos are freed now, not when Gradio drops its state."""
        if request is not None and (session := open_sessions.pop(request.session_hash, None)):
            close_session(session)

    end_session.__annotations__["request"] = gr.Request

    def model_kept(status: Any) -> tuple:
        """What a model switch updates (threshold, model line, window, stride, status)
        when the page keeps its model: the model line alone, and `status`."""
        return gr.update(), model_line(inspector), gr.update(), gr.update(), status

    @page_errors
    def load_model(path: str | None, session: Session | None) -> tuple:
        """Scan the next photos with another model; the photos on the page keep their
        figures until rescanned."""
        if not path:
            return model_kept(gr.update())
        try:
            inspector.use(load_classifier(path, device))
        except CrackLightningError as err:
            gr.Warning(f"{Path(path).name}: {err} The page keeps the model it had.")
            return model_kept(gr.update())
        new = decision_threshold(threshold, inspector.classifier.threshold)
        window = inspector.window
        kept = len(session.inspections) if session else 0
        said = f"The next photos dropped are scanned with {Path(path).name}."
        if kept:
            said += (
                f" The {kept} photo(s) on the page keep their figures (each row names its "
                "model): **Rescan with this model** scans the one shown again."
            )
        return (
            gr.update(value=new),
            model_line(inspector),
            window.patch_size,
            window.stride,
            said,
        )

    @page_errors
    def start_adapting(patch: float | None, stride: float | None) -> tuple:
        """Adapt the page's model from the marks of the Window box's size (and the masked
        photos beside them) in the background; or one line saying why not."""
        window = inspector.window
        size = int(patch) if patch else window.patch_size
        step = int(stride) if stride else window.stride
        refusal = adapt_refusal(inspector, adapter, size)
        if refusal is not None:
            running = adapter.running() is not None
            return refusal, gr.update(), gr.Timer(active=running)
        run = adapter.start(
            Path(inspector.classifier.source), inspector.marks_folder(size), (size, step)
        )
        return run.describe(), gr.update(interactive=False), gr.Timer(active=True)

    def adapt_progress() -> tuple:
        """The adaptation's line; Load the adapted model once it succeeded; the timer
        stopped once it ended."""
        run = adapter.run
        if run is None:
            return gr.update(), gr.update(), gr.Timer(active=False)
        return (
            run.describe(),
            gr.update(interactive=run.succeeded()),
            gr.Timer(active=not run.finished()),
        )

    @page_errors
    def load_adapted(session: Session | None) -> tuple:
        """The adapted checkpoint as the page's model (as Another model would be)."""
        run = adapter.run
        if run is None or not run.succeeded():
            return model_kept("No adapted model yet.")
        return load_model(str(run.checkpoint), session)

    with gr.Blocks(title="Crack inspector", analytics_enabled=False) as page:
        session = gr.State(None, time_to_live=session_minutes * 60, delete_callback=close_session)
        gr.Markdown("# Crack inspector")
        model_info = gr.Markdown(model_line(inspector), elem_id="model-info")
        with gr.Row():
            # the list of files dropped folds away, so it does not push the figure down
            with gr.Accordion("Photos dropped", open=True, elem_id="photos-list"):
                photos = gr.File(
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                    label="Drop photos here",
                    elem_id="photos",
                )
            with gr.Column():
                level = gr.Slider(
                    0.001,
                    0.999,
                    value=start,
                    step=0.001,
                    label="Threshold: a patch is cracked at or above this P(crack)",
                    elem_id="threshold",
                )
                with gr.Row():
                    patch = gr.Number(
                        inspector.window.patch_size,
                        label="Window (px), for the next photos dropped",
                        precision=0,
                        minimum=16,
                        elem_id="window",
                    )
                    stride = gr.Number(
                        inspector.window.stride,
                        label="Stride (px)",
                        precision=0,
                        minimum=1,
                        elem_id="stride",
                    )
                shown = gr.Dropdown(choices=[], label="Photo", elem_id="photo-choice")
                mark_as = gr.Radio(
                    list(MARK_CHOICES),
                    value="crack",
                    label="Clicking a patch marks it as",
                    elem_id="mark-as",
                )
                model_file = gr.File(
                    file_types=[".ckpt", ".onnx", ".pt"],
                    type="filepath",
                    label="Another model (.ckpt, .onnx, .pt)",
                    elem_id="model-file",
                )
        status = gr.Markdown(elem_id="status")
        verdict_line = gr.Markdown(elem_id="verdict")
        with gr.Row():
            opacity = gr.Slider(
                0,
                1,
                value=HEAT_OPACITY,
                step=0.05,
                label="Heat map opacity (0: the photo alone)",
                elem_id="opacity",
            )
            rescan_button = gr.Button("Rescan with this model", elem_id="rescan")
            report_button = gr.Button("Site report", elem_id="site-report")
        with gr.Row():
            adapt_button = gr.Button("Adapt from marks", elem_id="adapt")
            adapt_line = gr.Textbox(
                label="Adaptation (from the marks of the window size above, and masked "
                "photos beside them)",
                interactive=False,
                scale=4,
                elem_id="adapt-status",
            )
            load_button = gr.Button(
                "Load the adapted model", interactive=False, elem_id="load-adapted"
            )
            adapt_timer = gr.Timer(ADAPT_POLL_S, active=False)
        # the page's width, and most of the window's height
        shown_figure = gr.Image(
            type="pil",
            format="png",
            interactive=False,
            height="80vh",
            label="P(crack): red heat; yellow outline cracked, blue unfamiliar; "
            "magenta/green boxes: your marks; two models: the earlier left",
            elem_id="overlay",
        )
        summary = gr.Dataframe(
            headers=SUMMARY_COLUMNS, interactive=False, label="Photos", elem_id="summary"
        )
        table = gr.Dataframe(
            headers=PATCH_COLUMNS,
            interactive=False,
            label="Patches",
            max_height=400,
            elem_id="patches",
        )
        files_out = gr.File(
            file_count="multiple", interactive=False, label="Downloads", elem_id="downloads"
        )

        view = [shown_figure, verdict_line, table]
        photos.upload(
            scan,
            [photos, level, patch, stride, opacity, session],
            [session, shown, *view, summary, files_out, status],
            api_name="scan",
        )
        level.release(
            change_threshold,
            [level, shown, session],
            [session, *view, summary, files_out],
            api_name="threshold",
            trigger_mode="always_last",
        )
        shown.input(
            show,
            [shown, session],
            [session, *view],
            api_name="show",
        )
        shown_figure.select(
            mark,
            [mark_as, shown, session],
            [session, shown_figure, table, status],
            api_visibility="private",
        )
        rescan_button.click(
            rescan,
            [level, patch, stride, session],
            [session, *view, summary, files_out, status],
            api_name="rescan",
        )
        report_button.click(
            site_report,
            [level, session],
            [session, files_out, status],
            api_name="site_report",
        )
        opacity.release(
            set_opacity,
            [opacity, session],
            [session, *view],
            api_name="opacity",
            trigger_mode="always_last",
        )
        relabel = (change_threshold, [level, shown, session], [session, *view, summary, files_out])
        switched = [level, model_info, patch, stride, status]  # what a new model changes
        # after a new model, the photos on the page relabelled at its threshold
        model_file.upload(load_model, [model_file, session], switched, api_name="model").then(
            *relabel, api_visibility="private"
        )
        adapt_button.click(
            start_adapting,
            [patch, stride],
            [adapt_line, load_button, adapt_timer],
            api_name="adapt",
        )
        adapt_timer.tick(
            adapt_progress, None, [adapt_line, load_button, adapt_timer], api_name="adapt_progress"
        )
        load_button.click(load_adapted, [session], switched, api_name="load_adapted").then(
            *relabel, api_visibility="private"
        )
        page.unload(end_session)
    return page


def serve(page: Any, host: str, port: int | None, open_browser: bool) -> str:
    """Serve the page on this machine in the background (no share link, no telemetry);
    returns its address."""
    gr = gradio()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's calls to itself
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=open_browser,
        prevent_thread_lock=True,
        show_error=True,
        quiet=True,
        theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS),
        footer_links=[],
        run_history=False,
        enable_monitoring=False,
        mcp_server=False,
        ssr_mode=False,
    )
    return page.local_url
