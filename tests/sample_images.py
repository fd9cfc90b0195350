"""Small images for the stand-ins: distinct bytes per seed, each with its format's signature.

PNG and GIF are real, decodable images; the JPEG and WebP ones carry a valid signature and header but are not
decodable pictures (the Bedrock emulator, like the service's first check, goes by the signature).
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


def jpeg(seed: int) -> bytes:
    comment = f"sample {seed}".encode()
    jfif = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + jfif + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + b"\xff\xd9"


def gif(seed: int) -> bytes:
    color = bytes(((seed * 97) % 256, (seed * 57) % 256, (seed * 13) % 256))
    return (b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + color + b"\x00\x00\x00"
            b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


def webp(seed: int) -> bytes:
    payload = b"VP8L" + struct.pack("<I", 5) + b"\x2f\x00\x00\x00" + bytes([seed % 256]) + b"\x00"
    return b"RIFF" + struct.pack("<I", 4 + len(payload)) + b"WEBP" + payload


BY_SUFFIX = {".png": png, ".jpg": jpeg, ".jpeg": jpeg, ".gif": gif, ".webp": webp}


def for_key(key: str, seed: int) -> bytes:
    """Bytes for an image key, by its extension (case-insensitive)."""
    suffix = key[key.rfind("."):].lower()
    return BY_SUFFIX[suffix](seed)
