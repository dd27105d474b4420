"""A labelled grid of equal tiles, as ``ldm-inpaint ablate`` draws one per pair: axis names, row and column
labels, two caption lines under each tile, failed cells as gray tiles that say why."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

LINE_HEIGHT = 14  # px per line of text (PIL's default font is 11 px tall)
GAP = 4  # px between tiles
LABEL_WIDTH = 128  # px of the row-label column left of the tiles
HEADER_HEIGHT = 3 * LINE_HEIGHT  # title, axis names, column labels
CAPTION_HEIGHT = 2 * LINE_HEIGHT  # under each tile: hash, evaluations, time; the two measurements
FAILED_GRAY = (200, 200, 200)


def grid_size(rows: int, columns: int, tile: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a grid of ``rows`` x ``columns`` tiles of ``tile = (width, height)`` pixels."""
    return LABEL_WIDTH + columns * (tile[0] + GAP), HEADER_HEIGHT + rows * (tile[1] + CAPTION_HEIGHT + GAP)


def _fit(text: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """``text`` cut to ``width`` pixels, with "..." when cut."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, width: int, lines: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> list[str]:
    """``text`` broken into at most ``lines`` lines of ``width`` pixels, after a space where there is one; the
    last line cut."""
    wrapped: list[str] = []
    while text and len(wrapped) < lines - 1:
        end = len(text)
        while end > 1 and font.getlength(text[:end]) > width:
            end -= 1
        space = text.rfind(" ", 0, end)
        if end < len(text) and space > 0:
            end = space + 1
        wrapped.append(text[:end].rstrip())
        text = text[end:].lstrip()
    return [*wrapped, _fit(text, width, font)] if text else wrapped


def draw_grid(
    title: str,
    row_axis: tuple[str, list[str]] | None,
    column_axis: tuple[str, list[str]] | None,
    tiles: list[list[tuple[Image.Image | None, tuple[str, str], str]]],
    tile_size: tuple[int, int],
) -> Image.Image:
    """A labelled grid of equal tiles: a title line, the axis names, column labels above and row labels left of
    the tiles, and two caption lines under each. ``row_axis`` / ``column_axis`` = (name, one label per row /
    column); ``tiles[r][c] = (image, or None for a gray tile showing ``failure``, caption lines, failure)``."""
    font = ImageFont.load_default()
    rows, columns = len(tiles), len(tiles[0])
    width, height = tile_size
    grid = Image.new("RGB", grid_size(rows, columns, tile_size), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((GAP, 0), _fit(title, grid.width - 2 * GAP, font), fill="black", font=font)
    if row_axis is not None:
        draw.text(
            (GAP, LINE_HEIGHT), _fit(f"rows: {row_axis[0]}", LABEL_WIDTH - GAP, font), fill="black", font=font
        )
    if column_axis is not None:
        text = _fit(f"columns: {column_axis[0]}", grid.width - LABEL_WIDTH, font)
        draw.text((LABEL_WIDTH, LINE_HEIGHT), text, fill="black", font=font)
    for c in range(columns):
        x = LABEL_WIDTH + c * (width + GAP)
        if column_axis is not None:
            label = _fit(column_axis[1][c], width, font)
            draw.text((x, 2 * LINE_HEIGHT), label, fill="black", font=font)
        for r in range(rows):
            y = HEADER_HEIGHT + r * (height + CAPTION_HEIGHT + GAP)
            image, caption, failure = tiles[r][c]
            if image is None:
                draw.rectangle((x, y, x + width - 1, y + height - 1), fill=FAILED_GRAY)
                for i, line in enumerate(_wrap(failure, width - 2, height // LINE_HEIGHT, font)):
                    draw.text((x + 1, y + i * LINE_HEIGHT), line, fill="black", font=font)
            else:
                grid.paste(image, (x, y))
            for i, line in enumerate(caption):
                draw.text((x, y + height + i * LINE_HEIGHT), _fit(line, width, font), fill="black", font=font)
    if row_axis is not None:
        for r, value in enumerate(row_axis[1]):
            y = HEADER_HEIGHT + r * (height + CAPTION_HEIGHT + GAP)
            lines = _wrap(value, LABEL_WIDTH - 2 * GAP, max(1, height // LINE_HEIGHT), font)
            for i, line in enumerate(lines):
                draw.text((GAP, y + i * LINE_HEIGHT), line, fill="black", font=font)
    return grid
