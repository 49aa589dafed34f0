"""Reading text files as UTF-8 with errors that name the file, line and column."""
from pathlib import Path

import pytest

from arcface.textfile import DataError, read_text


def test_a_byte_that_is_not_utf8_names_file_line_and_column(tmp_path: Path):
    path = tmp_path / "notes.txt"
    # Line 3 holds two characters (one of them two bytes long) before the Latin-1 e-acute.
    path.write_bytes("first\r\nsecond\nxé".encode() + b"\xe9t\xc3\n")
    with pytest.raises(DataError) as caught:
        read_text(path)
    assert str(caught.value) == f"{path}:3: not UTF-8 text (byte 0xE9 at column 3)"
    assert isinstance(caught.value, ValueError)


def test_line_numbers_count_crlf_and_cr_line_ends(tmp_path: Path):
    path = tmp_path / "old-mac.txt"
    path.write_bytes(b"a\rb\r\nc\n\xff")
    with pytest.raises(DataError, match=r"old-mac\.txt:4: not UTF-8 text \(byte 0xFF at column 1\)"):
        read_text(path)


def test_a_truncated_character_at_the_end_is_reported(tmp_path: Path):
    path = tmp_path / "cut.txt"
    path.write_bytes("ok\nab".encode() + "é".encode()[:1])
    with pytest.raises(DataError, match=r"cut\.txt:2: not UTF-8 text \(byte 0xC3 at column 3\)"):
        read_text(path)


def test_byte_order_mark_is_dropped_and_newlines_are_universal(tmp_path: Path):
    path = tmp_path / "windows.txt"
    path.write_bytes(b"\xef\xbb\xbfname = 1\r\nzw\xc3\xb6lf\rend\n")
    assert read_text(path) == "name = 1\nzwölf\nend\n"


def test_a_missing_file_raises_file_not_found_naming_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        read_text(tmp_path / "absent.txt")
