"""Reading the project's text files (partition list, margin file, configs, result files) as UTF-8.

A byte that is not UTF-8 (a file saved as Latin-1 or UTF-16, or not a text file at all) is
reported as ``PATH:LINE: not UTF-8 text (byte 0xNN at column C)`` instead of Python's bare
UnicodeDecodeError, which names neither the file nor the line.
"""
from __future__ import annotations

import codecs
import os


class DataError(ValueError):
    """A data or configuration file that is not what the project expects.

    The message is one line that starts with the file (and line, where there is one), so a
    launcher can print it as it is. A ValueError, so existing ``except ValueError`` still works.
    """


def read_text(path: str | os.PathLike) -> str:
    """The file's text, decoded as UTF-8, with universal newlines (CRLF and CR become LF).

    A leading byte-order mark is dropped (editors on Windows write one). A missing or unreadable
    file raises the usual OSError, which names the path.
    """
    with open(path, "rb") as file:
        data = file.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(_describe(os.fspath(path), data, error.start)) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _describe(path: str, data: bytes, offset: int) -> str:
    # Lines counted as read_text returns them (CRLF and CR end a line too).
    before = data[:offset].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    line = before.count(b"\n") + 1
    # Everything before the bad byte decoded, so the column counts characters, as editors do.
    column = len(before[before.rfind(b"\n") + 1:].decode("utf-8")) + 1
    return f"{path}:{line}: not UTF-8 text (byte 0x{data[offset]:02X} at column {column})"
