"""Draw a simulated schedule as a PNG in the style of the DualPipe figure.

One row per rank, one box per compute action at its simulated time, labelled with
its micro-batch. Forward, full backward, input-only backward and W each have a
colour, darker for chunk 0 and lighter for chunk 1 (the two directions under
DualPipe). A paired F&B is one box with a black border, its forward half and
backward half in their own colours.
"""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from megadual.pipeline.actions import Action, Kind
from megadual.pipeline.sim_result import SimResult

COLOURS = {  # kind -> (chunk 0, chunk 1)
    Kind.F: ((245, 150, 60), (252, 208, 160)),
    Kind.B: ((70, 160, 80), (165, 215, 170)),
    Kind.BI: ((60, 170, 190), (165, 222, 230)),
    Kind.W: ((100, 120, 215), (180, 190, 240)),
}
ROW, LEFT, TOP, BOTTOM, MIN_BOX, MAX_WIDTH = 30, 70, 44, 44, 24, 6000


def draw_timeline(result: SimResult, path: str, title: str = "") -> None:
    durations = [i.end - i.start for rows in result.timeline for i in rows if i.end > i.start]
    scale = min(MIN_BOX / min(durations, default=1.0), MAX_WIDTH / max(result.makespan, 1e-9))
    width = max(LEFT + int(result.makespan * scale) + 20, 900)  # at least the legend's width
    height = TOP + ROW * len(result.timeline) + BOTTOM
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.text((LEFT, 12), title, fill="black", font=font)
    for rank, intervals in enumerate(result.timeline):
        y = TOP + rank * ROW
        draw.text((8, y + ROW // 2 - 7), f"rank {rank}", fill="black", font=font)
        for interval in intervals:
            x0, x1 = LEFT + interval.start * scale, LEFT + interval.end * scale
            _draw_action(draw, font, interval.action, (x0, y + 2, x1, y + ROW - 2))
    _draw_legend(draw, font, height - BOTTOM + 14)
    image.save(path)


def _draw_action(draw: ImageDraw.ImageDraw, font, action: Action, box: tuple[float, ...]) -> None:
    x0, y0, x1, y1 = box
    if action.kind != Kind.FB:
        _cell(draw, font, (x0, y0, x1, y1), COLOURS[action.kind][action.chunk % 2], action.mb, "gray")
        return
    middle = (x0 + x1) / 2
    _cell(draw, font, (x0, y0, middle, y1), COLOURS[Kind.F][action.chunk % 2], action.mb, None)
    _cell(draw, font, (middle, y0, x1, y1), COLOURS[Kind.B][action.b_chunk % 2], action.b_mb, None)
    draw.rectangle((x0, y0, x1, y1), outline="black", width=2)


def _cell(draw: ImageDraw.ImageDraw, font, box, colour, label: int | str, outline: str | None) -> None:
    draw.rectangle(box, fill=colour, outline=outline)
    text = str(label)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    if right - left <= box[2] - box[0] - 2:
        x = (box[0] + box[2] - (right - left)) / 2 - left
        y = (box[1] + box[3] - (bottom - top)) / 2 - top
        draw.text((x, y), text, fill="black", font=font)


def _draw_legend(draw: ImageDraw.ImageDraw, font, y: int) -> None:
    names = {Kind.F: "forward", Kind.B: "backward", Kind.BI: "backward (input)", Kind.W: "weights (W)"}
    x = LEFT
    for kind, name in names.items():
        for chunk in (0, 1):
            draw.rectangle((x, y, x + 14, y + 14), fill=COLOURS[kind][chunk], outline="gray")
            x += 16
        draw.text((x + 4, y + 1), name, fill="black", font=font)
        x += 20 + int(draw.textlength(name, font=font))
    draw.rectangle((x, y, x + 30, y + 14), outline="black", width=2)
    draw.text((x + 36, y + 1), "paired F&B   (dark: chunk 0, light: chunk 1)", fill="black", font=font)
