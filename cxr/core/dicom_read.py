"""Bytes -> pydicom ``Dataset``, with typed rejections for content that is not DICOM, cut short or malformed.

pydicom reads leniently: a file cut inside an element comes back as a shorter dataset, and a file cut inside
encapsulated (compressed) pixel data comes back with the Pixel Data element silently dropped. So after parsing,
``find_truncation`` walks the element structure once more (values are skipped, not read) and reports any element
whose declared extent runs past the end of the data. numpy + pydicom only; never imports torch.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO

from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from cxr.core.errors import InvalidInputError, NotDicomError, TooLargeError, TruncatedDicomError

logger = logging.getLogger(__name__)

# What pydicom, its pixel plugins and Pillow raise on bad content. Caught only around third-party calls.
BAD_CONTENT_ERRORS: tuple[type[Exception], ...] = (
    ValueError,  # includes UnicodeDecodeError, struct-size mismatches reported by pydicom
    TypeError,
    LookupError,  # KeyError, IndexError
    AttributeError,  # pydicom reports missing/unusable elements this way
    EOFError,
    OSError,  # Pillow: "broken data stream"
    struct.error,
    zlib.error,
    OverflowError,
    ZeroDivisionError,
    NotImplementedError,  # pydicom: an option or bit depth it cannot handle
    RuntimeError,  # pylibjpeg / pyjpegls decoder failures
    BytesLengthException,  # pydicom: a value whose length does not fit its VR
    Image.DecompressionBombError,  # Pillow plugin of pydicom, for sizes beyond any sane max_pixels
)

PIXEL_DATA_TAG = 0x7FE00010
_PREAMBLE = 128
_SEQUENCE_DELIMITERS = (b"\xfe\xff\xdd\xe0\0\0\0\0", b"\xff\xfe\xe0\xdd\0\0\0\0")  # (FFFE,E0DD), LE / BE
_UNDEFINED_LENGTH = 0xFFFFFFFF
# A deflated dataset (rare for images) may not inflate past 256 MiB: zip-bomb guard. More than the largest image the
# pixel cap admits (100 M pixels x 2 bytes); the inflated body is held in memory, so the cap bounds each request.
MAX_INFLATED_BYTES = 256 << 20


@contextmanager
def malformed_as(reason: str, what: str) -> Iterator[None]:
    """Turn third-party parsing errors inside the block into ``InvalidInputError(reason=reason)``.

    ``what`` names the step for the message (e.g. "the DICOM header"); pydicom's own text is appended, it
    carries element tags and lengths, never element values.
    """
    try:
        yield
    except BAD_CONTENT_ERRORS as exc:
        raise InvalidInputError(f"could not parse {what}: {brief(exc)}", reason=reason) from exc


def brief(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` of a third-party exception, cut to ``limit`` characters for an error message."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def has_dicom_prefix(data: bytes) -> bool:
    """True when ``data`` has the Part 10 file layout: 128-byte preamble then ``DICM``."""
    return data[_PREAMBLE : _PREAMBLE + 4] == b"DICM"


def _starts_like_dataset(data: bytes) -> bool:
    """A raw dataset without preamble (older PACS exports): first element is in group 0002 or 0008, LE."""
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[2:4] != b"\x00\x00"


def parse_dicom(data: bytes, *, header_only: bool) -> FileDataset:
    """Parse DICOM bytes into a dataset (``header_only``: stop before Pixel Data).

    Raises NotDicomError (no DICM prefix and no plausible raw dataset), TruncatedDicomError (the data ends inside
    an element), TooLargeError (a deflated dataset inflating past MAX_INFLATED_BYTES),
    InvalidInputError(reason="MALFORMED_DICOM") (pydicom cannot parse the structure).
    """
    prefixed = has_dicom_prefix(data)
    if not prefixed and not _starts_like_dataset(data):
        raise NotDicomError(f"not a DICOM file: no 'DICM' prefix at byte 128 ({len(data)} bytes received)")
    problem = find_truncation(data, header_only=header_only)
    if problem is not None:
        raise TruncatedDicomError(problem)
    try:
        return dcmread(BytesIO(data), stop_before_pixels=header_only, force=not prefixed)
    except InvalidDicomError as exc:
        raise NotDicomError(f"not a DICOM file: {exc}") from exc
    except BAD_CONTENT_ERRORS as exc:
        raise InvalidInputError(f"malformed DICOM: {brief(exc)}", reason="MALFORMED_DICOM") from exc


def transfer_syntax_of(ds: Dataset) -> UID:
    """The dataset's transfer syntax: from the file meta, else guessed from how pydicom read the body."""
    uid = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if uid:
        return UID(str(uid))
    implicit, _little = ds.original_encoding
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def find_truncation(data: bytes, *, header_only: bool) -> str | None:
    """Return why ``data`` looks cut short (an element running past the end), or None when it ends cleanly.

    Only positive evidence counts: structure this walker cannot follow gives None and is left to pydicom.
    """
    fp = BytesIO(data)
    fp.seek(_PREAMBLE + 4 if has_dicom_prefix(data) else 0)
    meta_problem, meta = _walk(fp, len(data), implicit=False, little=True, stop=_past_file_meta)
    if meta_problem is not None:
        return f"{meta_problem} (file meta information)"
    ts = UID(meta.get(0x00020010, b"").decode("ascii", "replace").strip("\0 "))
    implicit, little = _body_encoding(ts, data[fp.tell() : fp.tell() + 6])
    body, fp = _dataset_body(fp, ts)
    if body is None:
        return "the deflated dataset ends before the end of its compressed stream"
    if fp.tell() >= len(body):
        return "the file ends right after its file meta information"
    stop = _at_pixel_data if header_only else None
    problem, _ = _walk(fp, len(body), implicit=implicit, little=little, stop=stop)
    return problem


def _body_encoding(ts: UID, first_element: bytes) -> tuple[bool, bool]:
    """(implicit VR, little endian) of the dataset body. Every compressed syntax is explicit VR little endian;
    without a transfer syntax, guess from whether the first element carries two letters where a VR would be."""
    if ts == ImplicitVRLittleEndian:
        return True, True
    if ts == ExplicitVRBigEndian:
        return False, False
    if not ts:
        return not first_element[4:6].isalpha(), True
    return False, True


def _dataset_body(fp: BytesIO, ts: UID) -> tuple[bytes | None, BytesIO]:
    """The dataset bytes after the file meta (inflated for the deflated transfer syntax; None if incomplete)."""
    if ts != DeflatedExplicitVRLittleEndian:
        return fp.getvalue(), fp
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(fp.read(), MAX_INFLATED_BYTES)
    except zlib.error:
        return b"", BytesIO(b"")  # corrupt, not provably truncated: pydicom's reader reports it
    if inflater.unconsumed_tail:
        raise TooLargeError(f"the deflated dataset inflates to more than {MAX_INFLATED_BYTES} bytes")
    if not inflater.eof:
        return None, fp
    return body, BytesIO(body)


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag == PIXEL_DATA_TAG


def _walk(
    fp: BytesIO, size: int, *, implicit: bool, little: bool, stop: Callable[[BaseTag, str | None, int], bool] | None
) -> tuple[str | None, dict[int, bytes]]:
    """Step over the elements from ``fp``'s position; return (truncation problem or None, small values by tag)."""
    small: dict[int, bytes] = {}
    end = fp.tell()
    try:
        for elem in data_element_generator(fp, implicit, little, stop_when=stop, defer_size=256):
            problem = _element_problem(elem, fp, size)
            if problem is not None:
                return problem, small
            value = getattr(elem, "value", None)
            if isinstance(value, bytes):
                small[int(elem.tag)] = value
            end = fp.tell()
    except EOFError as exc:  # pydicom: an undefined-length value without its closing delimiter
        return f"the data ends inside an element ({exc})", small
    except BAD_CONTENT_ERRORS as exc:
        if fp.tell() >= size:  # the parser ran out of bytes: the data ends inside an element
            return f"the data ends inside an element ({brief(exc)})", small
        logger.debug("structure walk stopped at byte %d: %s", fp.tell(), type(exc).__name__)
        return None, small
    if 0 < size - end < 8:  # pydicom stops quietly on a partial element header
        return f"the data ends inside an element header ({size - end} trailing bytes)", small
    return None, small


def _element_problem(elem: object, fp: BytesIO, size: int) -> str | None:
    """Truncation evidence for one element just read: its declared value runs past ``size``, or an
    undefined-length value (sequence, encapsulated pixel data) is not closed by a complete sequence delimiter."""
    tag = getattr(elem, "tag", 0)
    length = getattr(elem, "length", None)
    value_tell = getattr(elem, "value_tell", None)
    if length is not None and length != _UNDEFINED_LENGTH and value_tell is not None and value_tell + length > size:
        where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        return f"element {where} declares {length} bytes but only {size - value_tell} remain"
    if length == _UNDEFINED_LENGTH or getattr(elem, "is_undefined_length", False):
        end = fp.tell()
        if fp.getvalue()[end - 8 : end] not in _SEQUENCE_DELIMITERS:
            return f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of undefined length is not closed before the end"
    return None
