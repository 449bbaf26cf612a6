"""Main headers of compressed frames (JPEG, JPEG-LS, JPEG 2000), read before any decoder runs.

A decoder sizes its buffers from the codestream, not from the DICOM header: a frame whose codestream claims
56341 x 27538 pixels inside a 131 x 123 image kept a JPEG-LS decoder busy for two minutes. So every compressed
frame must declare exactly Rows x Columns and one component before it is decoded. Pure Python, no numpy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import UID

from cxr.core.errors import InvalidInputError

# ISO/IEC 10918-1 B.1.1.3 start-of-frame markers (C4 DHT, C8 JPG, CC DAC excluded) and ISO/IEC 14495-1 SOF55.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field
_J2K_START = b"\xff\x4f\xff\x51"  # SOC then SIZ
_END_MARKER = b"\xff\xd9"  # JPEG / JPEG-LS EOI and JPEG 2000 EOC share the code
_J2K_SEARCH = 4096  # a JP2 wrapper (non-conformant in DICOM, seen in the wild) puts the codestream a little later


@dataclass(frozen=True)
class FrameHeader:
    """Size and layout a compressed frame declares."""

    rows: int
    columns: int
    components: int
    precision: int


@dataclass(frozen=True)
class J2kHeader:
    """What a JPEG 2000 main header says about the first component (ISO/IEC 15444-1 A.5.1, A.6.1)."""

    start: int  # offset of SOC within the frame (0 for a raw codestream)
    width: int
    height: int
    components: int
    precision: int
    signed: bool
    levels: int  # wavelet decomposition levels: the most a decoder can reduce by
    offset: bool  # a non-zero image or tile origin (reduced sizes then do not follow ceil(size / 2**k))


def is_jpeg_family(ts: UID) -> bool:
    """JPEG baseline/extended/lossless and JPEG-LS transfer syntaxes (1.2.840.10008.1.2.4.50 - .81)."""
    return ts.startswith("1.2.840.10008.1.2.4.") and ts.split(".")[-1] in {"50", "51", "57", "70", "80", "81"}


def is_j2k_family(ts: UID) -> bool:
    """JPEG 2000 Part 1 and HTJ2K transfer syntaxes (1.2.840.10008.1.2.4.90 - .92, .201 - .203)."""
    return ts.startswith("1.2.840.10008.1.2.4.") and ts.split(".")[-1] in {"90", "91", "92", "201", "202", "203"}


def check_frame(frame: bytes, ts: UID, rows: int, columns: int) -> str | None:
    """Raise InvalidInputError(reason="CORRUPT_PIXEL_DATA") unless a JPEG/JPEG-LS/JPEG 2000 ``frame`` declares
    exactly ``rows`` x ``columns`` and one component. Other syntaxes (RLE) carry no size and pass.

    Returns a warning when the codestream lacks its end marker (EOI / EOC): decoders then fill the missing part
    with grey instead of failing, so the reader must know the image may be incomplete.
    """
    if is_jpeg_family(ts):
        header = jpeg_frame_header(frame)
    elif is_j2k_family(ts):
        j2k = parse_j2k_header(frame)
        header = None if j2k is None else FrameHeader(j2k.height, j2k.width, j2k.components, j2k.precision)
    else:
        return None
    if header is None:
        raise InvalidInputError(
            f"the first frame is not a readable {ts.name} codestream (no frame header found)",
            reason="CORRUPT_PIXEL_DATA",
        )
    if (header.rows, header.columns, header.components) != (rows, columns, 1):
        raise InvalidInputError(
            f"the codestream declares {header.columns} x {header.rows} pixels, {header.components} component(s); "
            f"the header says Columns x Rows = {columns} x {rows}, 1 component",
            reason="CORRUPT_PIXEL_DATA",
        )
    if not frame.rstrip(b"\0").endswith(_END_MARKER):
        return (
            "INCOMPLETE_CODESTREAM: the compressed frame has no end-of-image marker; part of the image may be missing"
        )
    return None


def jpeg_frame_header(stream: bytes) -> FrameHeader | None:
    """SOFn (or JPEG-LS SOF55) of a JPEG stream: lines, samples per line, components, precision; None if absent."""
    if stream[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(stream):
        if stream[i] != 0xFF:
            return None
        marker = stream[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_STANDALONE:
            i += 2
        elif marker in _JPEG_SOF:
            if i + 10 > len(stream):
                return None
            precision, lines, samples, components = struct.unpack(">BHHB", stream[i + 4 : i + 10])
            return FrameHeader(lines, samples, components, precision)
        else:
            i += 2 + struct.unpack(">H", stream[i + 2 : i + 4])[0]
    return None


def parse_j2k_header(frame: bytes) -> J2kHeader | None:
    """SIZ and COD of the JPEG 2000 codestream in ``frame`` (raw, or inside a JP2 wrapper); None when absent."""
    start = frame.find(_J2K_START, 0, _J2K_SEARCH)
    if start < 0 or len(frame) < start + 44:
        return None
    cs = frame[start:]
    xsiz, ysiz, xosiz, yosiz, _xt, _yt, xtosiz, ytosiz = struct.unpack(">8I", cs[8:40])
    components = struct.unpack(">H", cs[40:42])[0]
    ssiz = cs[42]
    levels = _j2k_levels(cs)
    return J2kHeader(
        start=start,
        width=max(0, xsiz - xosiz),
        height=max(0, ysiz - yosiz),
        components=components,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        levels=levels,
        offset=bool(xosiz or yosiz or xtosiz or ytosiz),
    )


def _j2k_levels(cs: bytes) -> int:
    """Decomposition levels from the COD marker segment of the main header (0 when not found)."""
    i = 2  # after SOC
    while i + 4 <= min(len(cs), _J2K_SEARCH) and cs[i] == 0xFF and cs[i + 1] not in (0x90, 0x93):  # until SOT/SOD
        if cs[i + 1] == 0x52:  # COD: Lcod(2) Scod(1) SGcod(4) SPcod: levels first
            return cs[i + 9] if i + 10 <= len(cs) else 0
        i += 2 + struct.unpack(">H", cs[i + 2 : i + 4])[0]
    return 0
