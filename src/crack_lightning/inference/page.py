"""The inspector's page (crack-app, docs/app.md): Gradio widgets wired to
inference/inspection.py. Gradio is imported here only, and only when the page is built:
the rest of the package works without the `app` extra.

Nothing leaves the machine: Gradio's analytics and version check are off, no share link is
made, the theme uses the system's fonts, and Gradio's files (uploads, the images it
serves) go under the folder chosen with files_dir (GRADIO_TEMP_DIR), not the current one.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crack_lightning.errors import CrackLightningError, PredictionError
from crack_lightning.evaluation.threshold import decision_threshold
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.inspection import (
    MARK_CHOICES,
    PATCH_COLUMNS,
    SUMMARY_COLUMNS,
    Inspection,
    Inspector,
    downloads,
    overlay,
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


@dataclass
class Session:
    """One browser tab's photos (by name, in the order dropped) and its download folder."""

    out: Path
    inspections: dict[str, Inspection] = field(default_factory=dict)
    # (uploaded file, model) pairs already scanned: a drop onto the list re-sends them all
    seen: set[tuple[str, str]] = field(default_factory=set)

    def current(self, name: str | None) -> Inspection | None:
        return self.inspections.get(name) if name else None


def model_line(inspector: Inspector) -> str:
    model = inspector.classifier
    stored = "none stored" if model.threshold is None else f"{model.threshold:.3f} stored"
    return (
        f"**Model:** `{model.source}` (patches resized to {model.image_size} px; threshold "
        f"{stored}) · **marks saved in:** `{inspector.labels_dir}`"
    )


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
    inspector: Inspector, threshold: float | None, files_dir: Path, device: str = "auto"
) -> Any:
    """The page as gr.Blocks: drop photos, see each overlay, verdict and patch table,
    move the threshold, mark patches, download the CSV and PNG files."""
    gr = gradio()
    downloads_root = Path(files_dir) / "downloads"
    start = decision_threshold(threshold, inspector.classifier.threshold)

    def photo_view(session: Session | None, name: str | None) -> tuple:
        inspection = session.current(name) if session else None
        if inspection is None:
            return None, "", None
        return (
            overlay(inspection),
            f"### {inspection.name}: {verdict(inspection.result)}",
            gr.update(value=patch_rows(inspection), headers=PATCH_COLUMNS),
        )

    @page_errors
    def scan(files: list[str] | None, level: float, session: Session | None) -> tuple:
        if session is None:
            session = Session(downloads_root / uuid.uuid4().hex)
        model = inspector.classifier.source
        files = [f for f in files or [] if (f, model) not in session.seen]
        scanned, refused = inspector.scan([Path(f) for f in files], level, session.out)
        session.seen.update((f, model) for f in files)
        for inspection in scanned:
            session.inspections[inspection.name] = inspection
        for name, reason in refused:
            gr.Warning(f"{name}: {reason}")
        lines = [f"Scanned {len(scanned)} photo(s)."] if scanned else []
        lines += [f"- skipped **{name}**: {reason}" for name, reason in refused]
        if not scanned and files:
            lines.insert(0, "No photo could be scanned.")
        names = list(session.inspections)
        shown = scanned[0].name if scanned else (names[-1] if names else None)
        files_out = downloads(list(session.inspections.values()), session.out)
        return (
            session,
            gr.update(choices=names, value=shown),
            *photo_view(session, shown),
            summary_rows(session.inspections.values()),
            [str(p) for p in files_out],
            "\n".join(lines),
        )

    @page_errors
    def change_threshold(level: float, name: str | None, session: Session | None) -> tuple:
        if session is None or not session.inspections:
            return None, "", None, None, None
        files_out = rethreshold(list(session.inspections.values()), level, session.out)
        return (
            *photo_view(session, name),
            summary_rows(session.inspections.values()),
            [str(p) for p in files_out],
        )

    @page_errors
    def mark(
        mark_as: str, name: str | None, session: Session | None, event: gr.SelectData
    ) -> tuple:
        inspection = session.current(name) if session else None
        if inspection is None or not event.index:
            return gr.update(), gr.update(), "Drop a photo first."
        index = patch_at(inspection, *event.index[:2])
        if index is None:
            return gr.update(), gr.update(), "No patch there (the scan's windows leave it out)."
        crop = inspector.mark(inspection, index, MARK_CHOICES[mark_as])
        x, y = inspection.result.boxes[index]
        said = f"saved {crop}" if crop else "its crop removed"
        return (
            overlay(inspection),
            gr.update(value=patch_rows(inspection), headers=PATCH_COLUMNS),
            f"Patch {index} at x={x}, y={y} of {inspection.name}: {mark_as} ({said}).",
        )

    mark.__annotations__["event"] = gr.SelectData  # how Gradio knows to pass the click

    @page_errors
    def load_model(path: str | None) -> tuple:
        if not path:
            return gr.update(), model_line(inspector)
        try:
            inspector.use(load_classifier(path, device))
        except CrackLightningError as err:
            gr.Warning(f"{Path(path).name}: {err} The page keeps the model it had.")
            return gr.update(), model_line(inspector)
        new = decision_threshold(threshold, inspector.classifier.threshold)
        return gr.update(value=new), model_line(inspector)

    with gr.Blocks(title="Crack inspector", analytics_enabled=False) as page:
        session = gr.State(None)
        gr.Markdown("# Crack inspector")
        model_info = gr.Markdown(model_line(inspector), elem_id="model-info")
        with gr.Row():
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
        figure = gr.Image(
            type="pil",
            format="png",
            interactive=False,
            label="P(crack): red heat; yellow outline cracked, blue unfamiliar; "
            "magenta/green boxes: your marks",
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

        view = [figure, verdict_line, table]
        photos.upload(
            scan,
            [photos, level, session],
            [session, shown, *view, summary, files_out, status],
            api_name="scan",
        )
        level.release(
            change_threshold,
            [level, shown, session],
            [*view, summary, files_out],
            api_name="threshold",
            trigger_mode="always_last",
        )
        shown.input(
            page_errors(lambda name, state: photo_view(state, name)),
            [shown, session],
            view,
            api_name="show",
        )
        figure.select(
            mark, [mark_as, shown, session], [figure, table, status], api_visibility="private"
        )
        model_file.upload(load_model, [model_file], [level, model_info], api_name="model").then(
            change_threshold,  # the photos on the page relabelled at the new model's threshold
            [level, shown, session],
            [*view, summary, files_out],
            api_visibility="private",
        )
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
