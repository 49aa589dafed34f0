"""Pictures of a model's results: a retrieval grid, and the training curves of a run.

    python tools/visualize.py grid results.json --out grid.png        # results of tools/search.py --json
    python tools/visualize.py curves runs/demo/metrics.jsonl --out curves.png   # needs matplotlib

The grid has one row per query: the query (blue border), then its top-K matches, each with its
score below it and a green border when it shows the query's item, red when it does not (grey
when items are unknown, e.g. a plain folder of images). It needs only Pillow. The curves (loss,
learning rate, Recall@1 and mAP@10 over epochs) need matplotlib, an optional extra.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw, ImageFont, ImageOps

from arcface.textfile import read_text
from tools.common import atomic_output, run_cli

# Grid geometry in pixels. A cell is a thumbnail inside a border, with a caption line below it.
BORDER = 4
GAP = 6  # between cells
QUERY_GAP = 14  # extra space between the query column and its matches
MARGIN = 10
CAPTION = 16
BACKGROUND = (255, 255, 255)
QUERY_COLOUR = (40, 90, 200)
SAME_ITEM_COLOUR = (30, 160, 60)
OTHER_ITEM_COLOUR = (210, 40, 40)
UNKNOWN_COLOUR = (190, 190, 190)
TEXT_COLOUR = (20, 20, 20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    grid = commands.add_parser("grid", help="query / top-K grid from the JSON of tools/search.py")
    grid.add_argument("results", help="JSON written by tools/search.py --json")
    grid.add_argument("--out", required=True, help="PNG file to write")
    grid.add_argument("--thumb", type=int, default=96, help="thumbnail side in pixels")
    grid.add_argument("--max_queries", type=int, default=None, help="first N queries only")
    grid.add_argument("--top_k", type=int, default=None, help="first K matches only")
    curves = commands.add_parser("curves", help="loss, lr, Recall@1, mAP@10 over epochs (matplotlib)")
    curves.add_argument("metrics", help="metrics.jsonl of a training run")
    curves.add_argument("--out", required=True, help="PNG file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "grid":
        results = read_results(args.results)[:args.max_queries]
        if args.top_k is not None:
            results = [{**result, "matches": result["matches"][:args.top_k]} for result in results]
        image = result_grid(results, args.thumb)
        with atomic_output(args.out) as tmp:
            image.save(tmp, format="PNG", optimize=True)
    else:
        plot_curves(read_metrics(args.metrics), args.out, title=str(Path(args.metrics).parent.name))
    print(f"written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------
# Result grid (Pillow only)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The "results" list of a tools/search.py JSON file, checked for the keys the grid uses."""
    try:
        data = json.loads(read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such results file (write one with tools/search.py --json)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or not results:
        raise ValueError(f"{path}: expected a non-empty 'results' list, as tools/search.py --json writes")
    for number, result in enumerate(results):
        matches = result.get("matches") if isinstance(result, dict) else None
        if "query" not in result or not isinstance(matches, list) or not matches:
            raise ValueError(f"{path}: results[{number}]: expected 'query' and a non-empty 'matches' list")
        for match in matches:
            if not {"path", "score"} <= set(match):
                raise ValueError(f"{path}: results[{number}]: every match needs 'path' and 'score', got {match}")
    return results


def grid_size(rows: int, columns: int, thumb: int) -> tuple[int, int]:
    """(width, height) of a grid of `rows` queries with `columns - 1` matches each."""
    cell = thumb + 2 * BORDER
    width = 2 * MARGIN + columns * cell + (columns - 1) * GAP + QUERY_GAP
    height = 2 * MARGIN + rows * (cell + CAPTION) + (rows - 1) * GAP
    return width, height


def cell_origin(row: int, column: int, thumb: int) -> tuple[int, int]:
    """Top-left corner of a cell's border; column 0 is the query."""
    cell = thumb + 2 * BORDER
    x = MARGIN + column * (cell + GAP) + (QUERY_GAP if column > 0 else 0)
    y = MARGIN + row * (cell + CAPTION + GAP)
    return x, y


def border_colour(query_item: str | None, match_item: str | None) -> tuple[int, int, int]:
    if query_item is None or match_item is None:
        return UNKNOWN_COLOUR
    return SAME_ITEM_COLOUR if query_item == match_item else OTHER_ITEM_COLOUR


def result_grid(results: list[dict[str, Any]], thumb: int = 96) -> Image.Image:
    """One row per query: the query, then its matches with scores and same-item borders."""
    if thumb < 8:
        raise ValueError(f"thumb: expected at least 8 pixels, got {thumb}")
    columns = 1 + max(len(result["matches"]) for result in results)
    canvas = Image.new("RGB", grid_size(len(results), columns, thumb), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, result in enumerate(results):
        query_item = result.get("item")
        _draw_cell(canvas, draw, font, cell_origin(row, 0, thumb), thumb, result["query"],
                   QUERY_COLOUR, "query")
        for column, match in enumerate(result["matches"], start=1):
            colour = border_colour(query_item, match.get("item"))
            _draw_cell(canvas, draw, font, cell_origin(row, column, thumb), thumb, match["path"],
                       colour, f"{match['score']:.3f}")
    return canvas


def _draw_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, font: Any, origin: tuple[int, int],
               thumb: int, path: str, colour: tuple[int, int, int], caption: str) -> None:
    x, y = origin
    cell = thumb + 2 * BORDER
    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
    canvas.paste(thumbnail(path, thumb), (x + BORDER, y + BORDER))
    text_width = draw.textlength(caption, font=font)
    draw.text((x + (cell - text_width) / 2, y + cell + 2), caption, fill=TEXT_COLOUR, font=font)


def thumbnail(path: str, side: int) -> Image.Image:
    """The image fitted into a side x side square (aspect ratio kept, padded with the background)."""
    try:
        with Image.open(path) as image:
            return ImageOps.pad(image.convert("RGB"), (side, side), color=BACKGROUND)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image listed in the results is missing") from None
    except OSError as error:
        raise OSError(f"{path}: cannot read this image: {error}") from None


# ------------------------------------------------------------------------------------------
# Training curves (matplotlib, optional)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a bad line names its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file (a run writes <out_dir>/metrics.jsonl)")
    records = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON: {error}") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise ValueError(f"{path}:{number}: expected a JSON object with an 'epoch' key")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records that carry a finite `key`."""
    points = [(record["epoch"], record[key]) for record in records
              if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])]
    return [epoch for epoch, _ in points], [value for _, value in points]


CURVES = (  # (metrics.jsonl key, panel title)
    ("loss", "training loss"),
    ("lr", "learning rate (end of epoch)"),
    ("recall@1", "Recall@1 (%)"),
    ("mAP@10", "mAP@10 (%)"),
)


def plot_curves(records: list[dict[str, Any]], out: str | Path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("training curves need matplotlib, an optional extra: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(2, 2, figsize=(8, 5.5), constrained_layout=True)
    for axis, (key, label) in zip(axes.flat, CURVES):
        epochs, values = series(records, key)
        if values:
            axis.plot(epochs, values, marker="o" if len(values) < 20 else None, markersize=4)
        else:
            axis.text(0.5, 0.5, f"no '{key}' in the log", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(label)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    with atomic_output(out) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(run_cli(main))
