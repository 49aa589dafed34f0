"""The In-Shop partition parser and the InShop data set."""
from pathlib import Path

import pytest
import torch

from arcface.inshop import InShop
from arcface.partition import read_partition
from arcface.synthetic import generate_inshop
from arcface.transforms import test_transform as make_test_transform

HEADER = "image_name item_id evaluation_status"


def partition_line(name: str, item: str, status: str) -> str:
    """One row as the real file writes it: columns padded with runs of spaces, trailing spaces."""
    return f"{name:<60}{item:<20}{status:<12}"


def write_partition(root: Path, rows, count=None, header=HEADER, newline="\n") -> Path:
    lines = [str(len(rows) if count is None else count), header]
    lines += [row if isinstance(row, str) else partition_line(*row) for row in rows]
    path = root / "Eval" / "list_eval_partition.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + newline).encode())
    return path


def image(item: str, view: int) -> str:
    return f"img/WOMEN/Dresses/{item}/{view:02d}_1_front.jpg"


# Train items A and C; test items B (two queries, one gallery) and D (one query, one gallery), plus
# a gallery-only item E. Rows interleave items and statuses the way the real file does.
SMALL_ROWS = [
    (image("id_0000000A", 1), "id_0000000A", "train"),
    (image("id_0000000B", 1), "id_0000000B", "query"),
    (image("id_0000000C", 1), "id_0000000C", "train"),
    (image("id_0000000D", 1), "id_0000000D", "gallery"),
    (image("id_0000000A", 2), "id_0000000A", "train"),
    (image("id_0000000B", 2), "id_0000000B", "gallery"),
    (image("id_0000000E", 1), "id_0000000E", "gallery"),
    (image("id_0000000D", 2), "id_0000000D", "query"),
    (image("id_0000000B", 3), "id_0000000B", "query"),
]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_parses_padded_columns_trailing_spaces_and_crlf(tmp_path: Path, newline: str):
    path = write_partition(tmp_path, SMALL_ROWS, newline=newline)
    assert "   \n" in path.read_text().replace("\r\n", "\n")  # the file really has trailing spaces
    rows = read_partition(path)
    assert [(r.image_name, r.item_id, r.status) for r in rows] == SMALL_ROWS
    assert [r.line for r in rows] == list(range(3, 3 + len(SMALL_ROWS)))


def test_tabs_and_trailing_blank_lines_are_tolerated(tmp_path: Path):
    rows = ["\t".join(row) + " \t" for row in SMALL_ROWS] + ["", "   "]
    path = write_partition(tmp_path, rows, count=len(SMALL_ROWS))
    assert [(r.image_name, r.item_id, r.status) for r in read_partition(path)] == SMALL_ROWS


def test_labels_follow_first_appearance_and_test_splits_share_numbering(tmp_path: Path):
    write_partition(tmp_path, SMALL_ROWS)
    train = InShop(tmp_path, "train", check_files=False)
    query = InShop(tmp_path, "query", check_files=False)
    gallery = InShop(tmp_path, "gallery", check_files=False)
    assert train.item_ids == ["id_0000000A", "id_0000000C"]
    assert train.labels.tolist() == [0, 1, 0]
    assert train.num_classes == 2
    # Query and gallery rows in file order: B, D, B, E, D, B -> B=0, D=1, E=2.
    assert query.item_ids == gallery.item_ids == ["id_0000000B", "id_0000000D", "id_0000000E"]
    assert query.labels.tolist() == [0, 1, 0]
    assert gallery.labels.tolist() == [1, 0, 2]
    assert query.labels.dtype == gallery.labels.dtype == torch.long
    assert query.samples[0] == (str(tmp_path / "Img" / image("id_0000000B", 1)), 0)


def expect_error(path: Path, line: int, *fragments: str, error=ValueError):
    with pytest.raises(error) as caught:
        read_partition(path)
    message = str(caught.value)
    assert f"{path}:{line}:" in message
    for fragment in fragments:
        assert fragment in message


def test_missing_partition_file_describes_the_layout(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as caught:
        InShop(tmp_path, "train")
    assert str(tmp_path / "Eval" / "list_eval_partition.txt") in str(caught.value)
    assert "Img/img/" in str(caught.value)


def test_count_line_must_be_an_integer(tmp_path: Path):
    expect_error(write_partition(tmp_path, SMALL_ROWS, count="52,712"), 1, "'52,712'")


def test_count_line_must_match_the_rows(tmp_path: Path):
    expect_error(write_partition(tmp_path, SMALL_ROWS, count=10), 1, "10", "9")


def test_header_is_checked(tmp_path: Path):
    expect_error(write_partition(tmp_path, SMALL_ROWS, header="image_name item_id status"), 2, HEADER)


def test_unknown_status_names_its_line(tmp_path: Path):
    rows = list(SMALL_ROWS)
    rows[3] = (rows[3][0], rows[3][1], "val")
    expect_error(write_partition(tmp_path, rows), 6, "'val'")


@pytest.mark.parametrize("bad_row", ["img/a.jpg id_00000001", "img/a b.jpg id_00000001 train"])
def test_wrong_column_count_names_its_line(tmp_path: Path, bad_row: str):
    rows = list(SMALL_ROWS) + [bad_row]
    expect_error(write_partition(tmp_path, rows), 12, "3 columns")


def test_image_paths_must_be_relative_to_img(tmp_path: Path):
    rows = list(SMALL_ROWS)
    rows[1] = ("Img/" + rows[1][0], rows[1][1], rows[1][2])
    expect_error(write_partition(tmp_path, rows), 4, "img/")


def test_duplicate_image_names_both_lines(tmp_path: Path):
    rows = list(SMALL_ROWS) + [SMALL_ROWS[2]]
    expect_error(write_partition(tmp_path, rows), 12, "line 5")


def test_item_in_train_and_query_names_both_lines(tmp_path: Path):
    rows = list(SMALL_ROWS) + [(image("id_0000000A", 9), "id_0000000A", "query")]
    expect_error(write_partition(tmp_path, rows), 12, "id_0000000A", "line 3")


def test_query_item_without_gallery_image(tmp_path: Path):
    rows = [row for row in SMALL_ROWS if not (row[1] == "id_0000000D" and row[2] == "gallery")]
    expect_error(write_partition(tmp_path, rows), 9, "id_0000000D", "gallery")


def test_a_partition_file_that_is_not_utf8_names_its_line(tmp_path: Path):
    path = write_partition(tmp_path, SMALL_ROWS)
    lines = path.read_bytes().split(b"\n")
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a byte-order mark is still fine
    lines[4] = lines[4].replace(b"img/", b"img/\xe9", 1)  # a Latin-1 e-acute in an image name
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError) as caught:
        read_partition(path)
    assert str(caught.value) == f"{path}:5: not UTF-8 text (byte 0xE9 at column 5)"


ROWS = list(SMALL_ROWS)
# Every way read_partition can refuse a file: (what, partition file contents).
MALFORMED = [
    ("empty", b""),
    ("count line only", b"9\n"),
    ("count not an integer", "52,712"),
    ("count too high", 10),
    ("header", "image_name item_id status"),
    ("two columns", ROWS + ["img/a.jpg id_00000001"]),
    ("unknown status", ROWS[:3] + [(ROWS[3][0], ROWS[3][1], "val")] + ROWS[4:]),
    ("path not under img/", [("Img/" + ROWS[0][0], *ROWS[0][1:])] + ROWS[1:]),
    ("duplicate image", ROWS + [ROWS[2]]),
    ("train item in query", ROWS + [(image("id_0000000A", 9), "id_0000000A", "query")]),
    ("query without gallery", [row for row in ROWS if row[:2] != (image("id_0000000D", 1), "id_0000000D")]),
    ("not UTF-8", b"9\n\xff\n"),
]


def write_case(root: Path, case) -> None:
    if isinstance(case, bytes):
        path = root / "Eval" / "list_eval_partition.txt"
        path.parent.mkdir(parents=True)
        path.write_bytes(case)
    elif isinstance(case, list):
        write_partition(root, case)
    elif isinstance(case, int):
        write_partition(root, ROWS, count=case)
    elif case.startswith("image_name"):
        write_partition(root, ROWS, header=case)
    else:
        write_partition(root, ROWS, count=case)


@pytest.mark.parametrize("what, case", MALFORMED, ids=[what for what, _ in MALFORMED])
def test_every_refusal_is_one_data_error_line_starting_with_the_file(tmp_path: Path, what: str, case):
    from arcface.textfile import DataError

    write_case(tmp_path, case)
    with pytest.raises(DataError) as caught:
        InShop(tmp_path, "query", check_files=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'Eval' / 'list_eval_partition.txt'}:")


def test_unknown_split_is_rejected(tmp_path: Path):
    write_partition(tmp_path, SMALL_ROWS)
    with pytest.raises(ValueError, match="'test'"):
        InShop(tmp_path, "test", check_files=False)


def test_real_in_shop_counts(tmp_path: Path):
    """A partition file with the published counts: 25,882 train images of 3,997 items, 14,218 query
    and 12,612 gallery images of 3,985 items, train and test items interleaved as in the real file."""
    train_items, test_items = 3997, 3985
    train_per_item = [7] * (25882 - 6 * train_items) + [6] * (train_items - (25882 - 6 * train_items))
    query_per_item = [4] * (14218 - 3 * test_items) + [3] * (test_items - (14218 - 3 * test_items))
    gallery_per_item = [4] * (12612 - 3 * test_items) + [3] * (test_items - (12612 - 3 * test_items))
    rows = []
    for number in range(train_items + test_items):
        item = f"id_{number + 1:08d}"
        if number % 2 == 0 and number // 2 < train_items or number // 2 >= test_items:
            statuses = ["train"] * train_per_item.pop()
        else:
            statuses = ["query"] * query_per_item.pop() + ["gallery"] * gallery_per_item.pop()
        rows += [(image(item, view + 1), item, status) for view, status in enumerate(statuses)]
    assert not (train_per_item or query_per_item or gallery_per_item)
    write_partition(tmp_path, rows)
    assert len(rows) == 52712
    sizes = {split: InShop(tmp_path, split, check_files=False) for split in ("train", "query", "gallery")}
    assert [len(sizes[split]) for split in ("train", "query", "gallery")] == [25882, 14218, 12612]
    assert sizes["train"].num_classes == 3997
    assert sizes["train"].labels.unique().tolist() == list(range(3997))
    assert sizes["query"].num_classes == sizes["gallery"].num_classes == 3985


# ---- on images: a small synthetic set in the same layout ----


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return generate_inshop(tmp_path_factory.mktemp("inshop") / "set", items=10, views=4, size=40, seed=3)


def item_folder(path: str) -> str:
    return Path(path).parent.name


@pytest.mark.parametrize("split", ["train", "query", "gallery"])
def test_labels_are_contiguous_in_order_of_first_appearance(synthetic_root: Path, split: str):
    data = InShop(synthetic_root, split)
    first_seen = list(dict.fromkeys(data.labels.tolist()))
    if split == "train":
        assert first_seen == list(range(data.num_classes))
    assert sorted(set(data.labels.tolist())) == sorted(first_seen)
    assert all(data.item_ids[label] == item_folder(path) for path, label in data.samples)


def test_query_and_gallery_labels_match_exactly_when_the_item_does(synthetic_root: Path):
    query, gallery = InShop(synthetic_root, "query"), InShop(synthetic_root, "gallery")
    train = InShop(synthetic_root, "train")
    assert not set(train.item_ids) & set(query.item_ids)
    for query_path, query_label in query.samples:
        for gallery_path, gallery_label in gallery.samples:
            assert (query_label == gallery_label) == (item_folder(query_path) == item_folder(gallery_path))


def test_getitem_returns_transformed_images(synthetic_root: Path):
    raw = InShop(synthetic_root, "query")
    image, label = raw[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 40)
    assert label == raw.labels[1].item()
    transformed = InShop(synthetic_root, "gallery", transform=make_test_transform(36, 32))
    batch = next(iter(torch.utils.data.DataLoader(transformed, batch_size=3)))
    assert batch[0].shape == (3, 3, 32, 32) and batch[0].dtype == torch.float32
    assert torch.equal(batch[1], transformed.labels[:3])


def test_corrupt_image_error_names_the_file(tmp_path: Path):
    root = generate_inshop(tmp_path / "set", items=4, views=2, size=32, seed=0)
    data = InShop(root, "train")
    broken = Path(data.samples[1][0])
    broken.write_bytes(broken.read_bytes()[:100])  # truncated JPEG
    with pytest.raises(OSError, match=broken.name):
        data[1]


def test_missing_images_are_reported_at_construction(tmp_path: Path):
    root = generate_inshop(tmp_path / "set", items=4, views=3, size=32, seed=0)
    paths = [path for path, _ in InShop(root, "train").samples]
    for path in paths[:2]:
        Path(path).unlink()
    with pytest.raises(FileNotFoundError) as caught:
        InShop(root, "train")
    message = str(caught.value)
    assert f"2 of {len(paths)} train images" in message
    assert "\n" not in message  # one line, however many are missing
    assert paths[0] in message and paths[1] in message
    assert "list_eval_partition.txt" in message
    InShop(root, "train", check_files=False)  # the check can be skipped


def test_many_missing_images_are_summarised_on_one_line(tmp_path: Path):
    root = generate_inshop(tmp_path / "set", items=4, views=4, size=32, seed=0)
    paths = [path for path, _ in InShop(root, "train").samples]
    for path in paths[:7]:
        Path(path).unlink()
    with pytest.raises(FileNotFoundError) as caught:
        InShop(root, "train")
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith(f"{', '.join(paths[:5])} and 2 more")


def test_max_pixels_is_passed_on_to_the_decoder(tmp_path: Path):
    root = generate_inshop(tmp_path / "set", items=4, views=2, size=32, seed=0)
    with pytest.raises(ValueError, match="max_pixels"):
        InShop(root, "train", max_pixels=0)
    data = InShop(root, "train", max_pixels=32 * 32 - 1)
    with pytest.raises(OSError) as caught:
        data[0]
    assert str(caught.value).startswith(f"{data.samples[0][0]}: the JPEG header claims 32 x 32")
    assert InShop(root, "train", max_pixels=32 * 32)[0][0].shape == (3, 32, 32)
