"""Pictures of a model's results: a retrieval grid, and the training curves of a run.

    python tools/visualize.py grid results.json --out grid.png        # results of tools/search.py --json
    python tools/visualize.py curves runs/demo/metrics.jsonl --out curves.png   # needs matplotlib

The grid has one row per query: the query (blue border), then its top-K matches, each with its
rank, score and item id below it and a green border when it shows the query's item, red when it
does not (grey when items are unknown, e.g. a plain folder of images, where the file name is
shown instead); a legend below the grid says so. It needs only Pillow. The curves (loss,
learning rate of every step, Recall@1 and mAP@10 over epochs) need matplotlib, an optional extra.
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

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from support.config import from_plain, load_toml
from arcface.textfile import read_text
from arcface.transforms import MAX_IMAGE_PIXELS, load_image
from support.schedule import lr_schedule
from support.snapshot import SnapshotError, read_snapshot
from tools.common import add_max_pixels_arg, atomic_output, check_max_pixels_arg, run_cli

# Grid geometry in pixels. A cell is a thumbnail inside a border, with two caption lines below it.
BORDER = 4
GAP = 6  # between cells
QUERY_GAP = 14  # extra space between the query column and its matches
MARGIN = 10
LINE = 13  # height of one line of Pillow's default font, with its spacing
CAPTION = 2 * LINE + 2
SWATCH = 10  # side of a legend's colour square
BACKGROUND = (255, 255, 255)
QUERY_COLOUR = (40, 90, 200)
SAME_ITEM_COLOUR = (30, 160, 60)
OTHER_ITEM_COLOUR = (210, 40, 40)
UNKNOWN_COLOUR = (190, 190, 190)
TEXT_COLOUR = (20, 20, 20)
LEGEND = (  # (border colour, meaning), drawn below the grid
    (QUERY_COLOUR, "query"),
    (SAME_ITEM_COLOUR, "same item as the query"),
    (OTHER_ITEM_COLOUR, "another item"),
    (UNKNOWN_COLOUR, "item not known"),
)
LEGEND_NOTE = "under each match: rank, cosine score, item id (or file name)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    grid = commands.add_parser("grid", help="query / top-K grid from the JSON of tools/search.py")
    grid.add_argument("results", help="JSON written by tools/search.py --json")
    grid.add_argument("--out", required=True, help="PNG file to write")
    grid.add_argument("--thumb", type=int, default=96, help="thumbnail side in pixels")
    grid.add_argument("--max_queries", type=int, default=None, help="first N queries only")
    grid.add_argument("--top_k", type=int, default=None, help="first K matches only")
    add_max_pixels_arg(grid)
    curves = commands.add_parser("curves", help="loss, lr, Recall@1, mAP@10 over epochs (matplotlib)")
    curves.add_argument("metrics", help="metrics.jsonl of a training run")
    curves.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    if args.command == "grid":
        check_max_pixels_arg(grid, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "grid":
        results = read_results(args.results)[:args.max_queries]
        if args.top_k is not None:
            results = [{**result, "matches": result["matches"][:args.top_k]} for result in results]
        image = result_grid(results, args.thumb, args.max_image_pixels)
        with atomic_output(args.out) as tmp:
            image.save(tmp, format="PNG", optimize=True)
    else:
        records = read_metrics(args.metrics)
        try:
            step_lr = step_learning_rates(args.metrics, records)
        except ValueError as why:
            print(f"note: the lr of every step is not shown: {why}", file=sys.stderr)
            step_lr = None
        plot_curves(records, args.out, title=str(Path(args.metrics).parent.name), step_lr=step_lr)
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
    """(width, height) of the cells of `rows` queries with `columns - 1` matches each (no legend)."""
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


def query_caption(number: int, result: dict[str, Any]) -> tuple[str, str]:
    """The two caption lines of a query: its number, and its item id or file name."""
    return f"query {number}", _item_or_name(result.get("item"), result["query"])


def match_caption(rank: int, match: dict[str, Any]) -> tuple[str, str]:
    """The two caption lines of a match: rank and cosine score, then its item id or file name."""
    return f"#{match.get('rank', rank)}  {match['score']:.3f}", _item_or_name(match.get("item"), match["path"])


def _item_or_name(item: str | None, path: str) -> str:
    return item if item else Path(path).name


def result_grid(results: list[dict[str, Any]], thumb: int = 96,
                max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """One row per query: the query, then its matches with captions and same-item borders; a legend."""
    if thumb < 8:
        raise ValueError(f"thumb: expected at least 8 pixels, got {thumb}")
    columns = 1 + max(len(result["matches"]) for result in results)
    width, height = grid_size(len(results), columns, thumb)
    font = ImageFont.load_default()
    legend = legend_rows(width - 2 * MARGIN, font)
    canvas = Image.new("RGB", (width, height + GAP + len(legend) * LINE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, result in enumerate(results):
        query_item = result.get("item")
        _draw_cell(canvas, draw, font, cell_origin(row, 0, thumb), thumb, result["query"],
                   QUERY_COLOUR, query_caption(row + 1, result), max_pixels)
        for column, match in enumerate(result["matches"], start=1):
            colour = border_colour(query_item, match.get("item"))
            _draw_cell(canvas, draw, font, cell_origin(row, column, thumb), thumb, match["path"],
                       colour, match_caption(column, match), max_pixels)
    _draw_legend(draw, font, legend, height - MARGIN + GAP)
    return canvas


def legend_rows(width: int, font: Any) -> list[list[tuple[tuple[int, int, int] | None, str]]]:
    """The legend's entries, (colour or None for plain text, text), wrapped into rows of `width`."""
    rows: list[list[tuple[tuple[int, int, int] | None, str]]] = [[]]
    used = 0
    for colour, text in LEGEND:
        entry = SWATCH + 4 + font.getlength(text) + 2 * GAP
        if rows[-1] and used + entry > width:
            rows.append([])
            used = 0
        rows[-1].append((colour, text))
        used += entry
    rows.append([(None, LEGEND_NOTE)])
    return rows


def _draw_legend(draw: ImageDraw.ImageDraw, font: Any, rows: list[list[tuple[Any, str]]], top: int) -> None:
    for number, row in enumerate(rows):
        x, y = MARGIN, top + number * LINE
        for colour, text in row:
            if colour is not None:
                draw.rectangle([x, y + 1, x + SWATCH - 1, y + SWATCH], fill=colour)
                x += SWATCH + 4
            draw.text((x, y), text, fill=TEXT_COLOUR, font=font)
            x += font.getlength(text) + 2 * GAP


def _draw_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, font: Any, origin: tuple[int, int],
               thumb: int, path: str, colour: tuple[int, int, int], caption: tuple[str, str],
               max_pixels: int) -> None:
    x, y = origin
    cell = thumb + 2 * BORDER
    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
    canvas.paste(thumbnail(path, thumb, max_pixels), (x + BORDER, y + BORDER))
    for number, line in enumerate(caption):
        text = fit_text(line, font, cell)
        text_width = draw.textlength(text, font=font)
        draw.text((x + (cell - text_width) / 2, y + cell + 2 + number * LINE), text, fill=TEXT_COLOUR, font=font)


def fit_text(text: str, font: Any, width: float) -> str:
    """`text`, shortened with '..' in the middle until it fits `width` pixels (item ids differ at the end)."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 1:
        keep -= 1
        head = (keep + 1) // 2
        shortened = text[:head] + ".." + text[len(text) - (keep - head):]
        if font.getlength(shortened) <= width:
            return shortened
    return ""


def thumbnail(path: str, side: int, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image fitted into a side x side square (aspect ratio kept, padded with the background).

    Decoded by load_image, like the images the model embedded, so an image whose header claims
    more than `max_pixels` is refused before decoding here too.
    """
    try:
        image = load_image(path, max_pixels)  # (3, H, W) uint8
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image listed in the results is missing") from None
    rgb = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    return ImageOps.pad(rgb, (side, side), color=BACKGROUND)


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


def step_learning_rates(metrics_path: str | Path, records: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(epoch, lr) of every optimizer step up to the last logged epoch; ValueError saying why not.

    metrics.jsonl logs only the lr of each epoch's last step, which hides the warm-up. The rest is
    recomputed with the trainer's own schedule (support.schedule.lr_schedule) from the run's config.toml
    and the steps per epoch its snapshot records. The base lr scales with the number of processes
    the run had, which the run directory does not record, so it is solved from a logged value
    (the schedule is linear in base lr and min_lr); every other logged value must then agree.
    Step i ends at epoch (i + 1) / steps_per_epoch, so an epoch's logged lr sits on its last step.
    """
    run_dir = Path(metrics_path).parent
    logged = [(record["epoch"], record["lr"]) for record in records
              if isinstance(record.get("lr"), (int, float)) and isinstance(record.get("epoch"), int)
              and record["epoch"] >= 1]
    if not logged:
        raise ValueError(f"{metrics_path}: no training records with an 'lr'")
    config_file = run_dir / "config.toml"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: not found (a run writes it next to metrics.jsonl)")
    cfg = from_plain(load_toml(config_file), f"{config_file}: ")
    try:
        steps = read_snapshot(cfg.snapshot_path, mmap=True).steps_per_epoch  # mmap: the weights stay on disk
    except SnapshotError as error:
        raise ValueError(f"{error} (its steps per epoch place the lr of every step)") from None
    epochs = max(epoch for epoch, _ in logged)
    if steps < 1 or epochs > cfg.total_epochs:
        raise ValueError(f"{config_file}: total_epochs {cfg.total_epochs} and {steps} steps per epoch "
                         f"do not fit the {epochs} epochs logged")
    shape = (cfg.total_epochs, steps, cfg.warmup_epochs, cfg.warmup_factor)
    per_base_lr = lr_schedule(1.0, *shape, 0.0)
    from_min_lr = lr_schedule(0.0, *shape, cfg.min_lr)
    last_steps = np.array([epoch * steps - 1 for epoch, _ in logged])
    values = np.array([lr for _, lr in logged])
    best = int(np.argmax(per_base_lr[last_steps]))  # the most precise value to solve from
    base_lr = (values[best] - from_min_lr[last_steps[best]]) / per_base_lr[last_steps[best]]
    schedule = lr_schedule(base_lr, *shape, cfg.min_lr)[:epochs * steps]
    if not np.allclose(schedule[last_steps], values, rtol=1e-6, atol=0.0):
        raise ValueError(f"{metrics_path}: its lr values follow another schedule than {config_file} "
                         "describes (changed on resume?)")
    positions = (np.arange(len(schedule)) + 1) / steps
    return positions.tolist(), schedule.tolist()


CURVES = (  # (metrics.jsonl key, panel title)
    ("loss", "training loss"),
    ("lr", "learning rate (end of epoch)"),  # retitled when every step's lr is known
    ("recall@1", "Recall@1 (%)"),
    ("mAP@10", "mAP@10 (%)"),
)


def plot_curves(records: list[dict[str, Any]], out: str | Path, title: str = "",
                step_lr: tuple[list[float], list[float]] | None = None) -> None:
    """The four panels of CURVES; `step_lr` (see step_learning_rates) draws the lr of every step."""
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
        if key == "lr" and step_lr is not None:
            axis.plot(*step_lr, linewidth=1.2, label="every step")
            axis.plot(epochs, values, "o", markersize=4, label="logged at epoch end")
            axis.legend(fontsize="small")
            label = "learning rate (every step)"
        elif values:
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
