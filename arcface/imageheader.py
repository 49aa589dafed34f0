"""The size an image file claims, read from its header without decoding it.

Covers exactly the formats torchvision's `decode_image` decodes (JPEG, PNG, GIF, WebP), so every
file that reaches the decoder has had its size checked. A few kilobytes can claim a huge image:
decoders allocate width x height x channels bytes up front and fill what the data lacks, so the
claim must be refused before decoding, not after. The parsers are written here rather than
taken from PIL because PIL applies its own global pixel limit while it opens a file.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# The most pixels an image header may claim before load_image refuses to decode it. The value is
# PIL's own default limit (PIL.Image.MAX_IMAGE_PIXELS, a 0.25 GB 24-bit bitmap): far above any
# photograph a retrieval set holds (In-Shop images are well under a megapixel), far below what a
# forged header can claim (a few bytes of JPEG may say 65535 x 65535, 12 GB decoded, per worker).
MAX_IMAGE_PIXELS = 89_478_485

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): they carry the size.
# 0xC4 (Huffman tables), 0xC8 (reserved) and 0xCC (arithmetic conditioning) share the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers (SOI is handled before the loop).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


class HeaderError(ValueError):
    """The header is missing, truncated or of a format the decoder does not read."""


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "JPEG", "PNG", "GIF" or "WebP"
    width: int
    height: int
    frames: int = 1  # images in the file (a GIF may hold an animation)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes) -> ImageHeader:
    """The format and size the file's bytes claim; HeaderError when they do not say."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg(data)
    if data[:8] == PNG_SIGNATURE:
        return _png(data)
    if data[:6] in GIF_SIGNATURES:
        return _gif(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    raise HeaderError(f"not a JPEG, PNG, GIF or WebP file (it starts with {data[:8]!r})")


def _jpeg(data: bytes) -> ImageHeader:
    position = 2  # after the start-of-image marker
    while True:
        # Like libjpeg, skip stray bytes before a marker and any 0xFF fill bytes.
        position = data.find(b"\xff", position)
        if position < 0:
            raise HeaderError("JPEG header ends before its frame header (SOF marker)")
        while position < len(data) and data[position] == 0xFF:
            position += 1
        if position >= len(data):
            raise HeaderError("JPEG header ends before its frame header (SOF marker)")
        marker = data[position]
        position += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            continue  # 0xFF00 is an escaped data byte, not a marker
        if marker in (0xD9, 0xDA):  # end of image, start of scan
            raise HeaderError("JPEG has no frame header (SOF marker) before its image data")
        if position + 2 > len(data):
            raise HeaderError("JPEG header is truncated")
        (length,) = struct.unpack_from(">H", data, position)
        if marker in _JPEG_SOF:
            # length (2 bytes), sample precision (1), height (2), width (2), components ...
            if position + 7 > len(data):
                raise HeaderError("JPEG frame header is truncated")
            height, width = struct.unpack_from(">HH", data, position + 3)
            return ImageHeader("JPEG", width, height)
        position += length


def _png(data: bytes) -> ImageHeader:
    # The first chunk must be IHDR: length (4), type (4), width (4), height (4), ...
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise HeaderError("PNG without an IHDR chunk after its signature")
    width, height = struct.unpack_from(">II", data, 16)
    return ImageHeader("PNG", width, height)


def _gif(data: bytes) -> ImageHeader:
    """The largest of the logical screen and every frame, and the number of frames.

    The decoder (giflib) holds every frame at its own size plus an output of frames x screen,
    so a small screen with a huge frame is a bomb as well.
    """
    if len(data) < 13:
        raise HeaderError("GIF header is truncated")
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    position = 13 + _gif_colour_table_size(flags)
    frames = 0
    while position < len(data):
        block = data[position]
        position += 1
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label byte, then data sub-blocks
            position = _skip_gif_sub_blocks(data, position + 1)
        elif block == 0x2C:  # image descriptor: left, top, width, height (2 bytes each), flags
            if position + 9 > len(data):
                break  # truncated: the decoder reports it
            frame_width, frame_height, frame_flags = struct.unpack_from("<HHB", data, position + 4)
            if frame_width * frame_height > width * height:
                width, height = frame_width, frame_height
            frames += 1
            # Local colour table, then the LZW minimum code size byte, then the data sub-blocks.
            position += 9 + _gif_colour_table_size(frame_flags) + 1
            position = _skip_gif_sub_blocks(data, position)
        else:
            break  # not a block: the decoder reports the file as corrupt
    return ImageHeader("GIF", width, height, frames)


def _gif_colour_table_size(flags: int) -> int:
    return 3 << ((flags & 0x07) + 1) if flags & 0x80 else 0


def _skip_gif_sub_blocks(data: bytes, position: int) -> int:
    while position < len(data):
        size = data[position]
        position += 1 + size
        if size == 0:
            break
    return position


def _webp(data: bytes) -> ImageHeader:
    if len(data) < 30:
        raise HeaderError("WebP header is truncated")
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: canvas width - 1 and height - 1, 3 bytes each
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8L":  # lossless: signature 0x2F, then 14 bits width - 1, 14 bits height - 1
        bits = int.from_bytes(data[21:25], "little")
        width = 1 + (bits & 0x3FFF)
        height = 1 + ((bits >> 14) & 0x3FFF)
    elif chunk == b"VP8 ":  # lossy: frame tag (3), start code (3), 14-bit width, 14-bit height
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
    else:
        raise HeaderError(f"WebP with an unknown first chunk {chunk!r}")
    return ImageHeader("WebP", width, height)
