"""Small images for the stand-ins: distinct bytes per seed, each with its format's signature.

Every one is a real, decodable image of one colour (a browser shows them: 05's results page), built here by hand so
that no imaging library is needed; the Bedrock emulator, like the service's first check, goes by the signature.
"""

from __future__ import annotations

import struct
import zlib


def png(seed: int, size: int = 8) -> bytes:
    r, g, b = (seed * 97) % 256, (seed * 57 + 31) % 256, (seed * 13 + 101) % 256
    row = b"\x00" + bytes((r, g, b)) * size
    raw = row * size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _color(seed: int) -> tuple[int, int, int]:
    return (seed * 97) % 256, (seed * 57 + 31) % 256, (seed * 13 + 101) % 256


def jpeg(seed: int) -> bytes:
    """A decodable 8×8 baseline JPEG of one colour: each of Y, Cb, Cr is one block with only a DC coefficient."""
    r, g, b = _color(seed + 1)
    ycc = (0.299 * r + 0.587 * g + 0.114 * b, 128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
           128 + 0.5 * r - 0.418688 * g - 0.081312 * b)
    dc_codes = ["00", "010", "011", "100", "101", "110", "1110", "11110", "111110"]  # categories 0-8 (Annex K.3)
    bits = ""
    for value in ycc:
        diff = round(value) - 128  # DC = 8 × (level - 128); quantised by 8 it is the level itself
        category = abs(diff).bit_length()
        extra = diff if diff >= 0 else diff + (1 << category) - 1
        bits += dc_codes[category] + (format(extra, f"0{category}b") if category else "") + "0"  # "0": EOB
    bits += "1" * (-len(bits) % 8)
    scan = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")

    def segment(marker: int, body: bytes) -> bytes:
        return bytes((0xFF, marker)) + struct.pack(">H", len(body) + 2) + body

    comment = f"sample {seed}".encode()
    jfif = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    components = b"".join(bytes((n, 0x11, 0)) for n in (1, 2, 3))
    dc_table = bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]) + bytes(range(12))
    ac_table = bytes([1] + [0] * 15) + b"\x00"  # one code, "0", for EOB
    return (b"\xff\xd8" + segment(0xE0, jfif) + segment(0xFE, comment) + segment(0xDB, b"\x00" + bytes([8] * 64))
            + segment(0xC0, b"\x08\x00\x08\x00\x08\x03" + components)
            + segment(0xC4, b"\x00" + dc_table) + segment(0xC4, b"\x10" + ac_table)
            + segment(0xDA, b"\x03" + b"".join(bytes((n, 0)) for n in (1, 2, 3)) + b"\x00\x3f\x00")
            + scan + b"\xff\xd9")


def gif(seed: int) -> bytes:
    color = bytes(((seed * 97) % 256, (seed * 57) % 256, (seed * 13) % 256))
    return (b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + color + b"\x00\x00\x00"
            b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


def webp(seed: int) -> bytes:
    """A decodable 1×1 lossless WebP (VP8L): five one-symbol prefix codes spell the pixel, read with no bits."""
    r, g, b = _color(seed + 2)
    bits = "0" * 14 + "0" * 14 + "0" + "000"  # width-1, height-1, alpha hint, version (LSB first)
    bits += "0" + "0" + "0"  # no transform, no colour cache, no meta prefix codes
    for symbol in (g, r, b, 255):  # green, red, blue, alpha: simple code, 1 symbol, 8-bit symbol
        bits += "1" + "0" + "1" + format(symbol, "08b")[::-1]
    bits += "1" + "0" + "0" + "0"  # distance: simple code, 1 symbol, 1-bit symbol 0
    bits += "0" * (-len(bits) % 8)
    data = b"\x2f" + bytes(int(bits[i:i + 8][::-1], 2) for i in range(0, len(bits), 8))
    payload = b"VP8L" + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(payload)) + b"WEBP" + payload


BY_SUFFIX = {".png": png, ".jpg": jpeg, ".jpeg": jpeg, ".gif": gif, ".webp": webp}


def for_key(key: str, seed: int) -> bytes:
    """Bytes for an image key, by its extension (case-insensitive)."""
    suffix = key[key.rfind("."):].lower()
    return BY_SUFFIX[suffix](seed)
