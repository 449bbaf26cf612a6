"""A corpus of broken and unusual DICOM files, generated from real ones, for the bad-input tests and the
bad-input run of ``benchmarks/bench_bad_input.py`` (never used by a service).

Every case says what a correct service answers: ``expect`` holds the acceptable outcomes, each either ``OK`` (a
result) or a rejection reason (``cxr-reason`` on gRPC, the start of the C-STORE Error Comment over DICOM).
``same_as`` names the real file whose findings an ``OK`` answer must reproduce (the same pixels, encoded
differently). Every case with an intact header gets its own SOP Instance UID, so no answer comes from the cache.

Sources (../shared/data/dicom, see its README): the NIH DX file (implicit VR, 8-bit, 1024 x 1024) for most
edits (small and quick), the SIIM CR (JPEG baseline), RG1 (MONOCHROME1, 15-bit) in JPEG 2000, the header-only CR.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

OK = "OK"
NIH, SIIM, J2K, HEADER_ONLY, PNG = (
    "nih_no_finding_dx.dcm",
    "siim_pneumothorax_negative.dcm",
    "RG1_J2KR.dcm",
    "cr_header_only_no_pixels.dcm",
    "png",
)
TRUNCATED = frozenset({"TRUNCATED_DICOM"})
MALFORMED = frozenset({"MALFORMED_DICOM", "TRUNCATED_DICOM", "CORRUPT_PIXEL_DATA", "PIXEL_DATA_SIZE_MISMATCH"})


@dataclass(frozen=True)
class Case:
    """One corpus file. ``sendable``: a DICOM SCU can send it (it has a readable file meta and SOP UIDs)."""

    name: str
    data: bytes = field(repr=False)
    expect: frozenset[str]
    same_as: str | None = None
    sendable: bool = True
    note: str = ""


class _Sources:
    """The real files, read once."""

    def __init__(self, dicom_dir: Path, png: Path | None) -> None:
        self.dir = dicom_dir
        self._png = png
        self._bytes: dict[str, bytes] = {}

    def raw(self, name: str) -> bytes:
        if name not in self._bytes:
            self._bytes[name] = (self.dir / name).read_bytes() if name != PNG else self._png_bytes()
        return self._bytes[name]

    def _png_bytes(self) -> bytes:
        if self._png is None:
            return b"\x89PNG\r\n\x1a\n" + bytes(4096)
        return self._png.read_bytes()

    def dataset(self, name: str) -> Dataset:
        """A fresh copy with new Study / Series / SOP Instance UIDs (no cache hit, no clash with the original)."""
        ds = dcmread(io.BytesIO(self.raw(name)))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds


def encode(ds: Dataset, *, implicit: bool | None = None) -> bytes:
    """A dataset -> Part 10 bytes (its own transfer syntax unless ``implicit`` says otherwise)."""
    buf = io.BytesIO()
    if implicit is None:
        ds.save_as(buf, enforce_file_format=True)
    else:
        ds.save_as(buf, implicit_vr=implicit, little_endian=True)
    return buf.getvalue()


def _fresh(src: _Sources, name: str, edit: Callable[[Dataset], None] | None = None) -> bytes:
    ds = src.dataset(name)
    if edit is not None:
        edit(ds)
    return encode(ds)


def _pixel_data_offset(data: bytes) -> int:
    """Byte offset of the Pixel Data element's tag (little endian) in ``data``."""
    return data.rindex(b"\xe0\x7f\x10\x00")


def _set_length_at(data: bytes, tag_offset: int, implicit: bool, length: int) -> bytes:
    at = tag_offset + 4 if implicit else tag_offset + 8  # explicit OB/OW: tag, VR, 2 reserved, 4-byte length
    return data[:at] + struct.pack("<I", length) + data[at + 4 :]


def _nih_pixels(src: _Sources) -> np.ndarray:
    return dcmread(io.BytesIO(src.raw(NIH))).pixel_array.astype(np.uint8)


def _with_pixels(ds: Dataset, pixels: np.ndarray, **attributes: object) -> None:
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()


def _deflated(src: _Sources) -> bytes:
    ds = src.dataset(NIH)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return encode(ds)


def _without_transfer_syntax(src: _Sources) -> bytes:
    ds = src.dataset(NIH)
    del ds.file_meta.TransferSyntaxUID
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def _declared(src: _Sources, name: str, ts: str) -> bytes:
    """The file's body left as it is, its file meta claiming transfer syntax ``ts``."""
    ds = src.dataset(name)
    body = encode(ds)
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = UID(ts)
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue() + body[132 + _meta_length(body) :]


def _meta_length(data: bytes) -> int:
    """Length of the file meta group (group length element value + its own 12 bytes)."""
    return 12 + int(struct.unpack("<I", data[140:144])[0])


def _huge_dimensions(ds: Dataset) -> None:
    ds.Rows = ds.Columns = 60000  # 3.6 G pixels declared; the pixel data is still 1 MB


def _multi_frame(src: _Sources, frames: int, stored: int) -> bytes:
    ds = src.dataset(NIH)
    pixels = _nih_pixels(src)
    _with_pixels(ds, np.stack([pixels] * stored), NumberOfFrames=frames)
    return encode(ds)


def _rgb(src: _Sources) -> bytes:
    ds = src.dataset(NIH)
    grey = _nih_pixels(src)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    _with_pixels(ds, rgb, SamplesPerPixel=3, PlanarConfiguration=0, PhotometricInterpretation="RGB")
    return encode(ds)


def _palette(src: _Sources) -> bytes:
    ds = src.dataset(NIH)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    lut = np.arange(256, dtype=np.uint16) * 257
    for group_element in (0x1101, 0x1102, 0x1103):  # Red / Green / Blue descriptor; the data 0x1201.. follows
        ds.add_new((0x0028, group_element), "US", [256, 0, 16])
        ds.add_new((0x0028, group_element + 0x100), "OW", lut.tobytes())
    return encode(ds)


def _signed(src: _Sources) -> bytes:
    ds = src.dataset(NIH)
    values = _nih_pixels(src).astype(np.int16) * 64 - 8192  # the same image as signed 16-bit values
    _with_pixels(ds, values, BitsAllocated=16, BitsStored=16, HighBit=15, PixelRepresentation=1)
    return encode(ds)


def _monochrome1(src: _Sources) -> bytes:
    ds = src.dataset(NIH)
    _with_pixels(ds, 255 - _nih_pixels(src), PhotometricInterpretation="MONOCHROME1")
    return encode(ds)


def _float_pixels(src: _Sources) -> bytes:
    ds = src.dataset(NIH)
    ds.FloatPixelData = (_nih_pixels(src).astype(np.float32) / 255).tobytes()
    del ds.PixelData
    return encode(ds)


def _deep_sequences(src: _Sources, depth: int) -> bytes:
    ds = src.dataset(NIH)
    item = Dataset()
    item.CodeMeaning = "leaf"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([item])
        item = outer
    ds.ContentSequence = item.ContentSequence
    return encode(ds)


def _jpeg_with_zeroed_scan(src: _Sources) -> bytes:
    data = bytearray(_fresh(src, SIIM))
    start = data.index(b"\xff\xda")  # start of scan: zero a stretch of entropy-coded data after it
    data[start + 2000 : start + 6000] = bytes(4000)
    return bytes(data)


def _jpeg_declared_on_raw(src: _Sources) -> bytes:
    return _declared(src, NIH, JPEGBaseline8Bit)


def _raw_dataset(src: _Sources) -> bytes:
    """No preamble, no 'DICM', no file meta: the bare dataset, as some old exports are."""
    ds = src.dataset(NIH)
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = buf.getvalue()
    if data[128:132] == b"DICM":
        data = data[132 + _meta_length(data) :]
    return data


def _zlib_bomb() -> bytes:
    """A tiny deflated 'DICOM' whose body inflates to 2 GiB of zeros."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 24)
    body = b"".join(compressor.compress(chunk) for _ in range(128)) + compressor.flush()
    return buf.getvalue() + body


def build_corpus(dicom_dir: Path, png: Path | None = None) -> list[Case]:
    """Every case, built from the real files in ``dicom_dir`` (and ``png``, a real radiograph PNG, if given)."""
    src = _Sources(dicom_dir, png)
    nih = _fresh(src, NIH)
    j2k = _fresh(src, J2K)
    siim = _fresh(src, SIIM)
    pixels_at = _pixel_data_offset(nih)
    c = Case
    return [
        # -- not DICOM at all ----------------------------------------------------------------------------------
        c("empty", b"", frozenset({"EMPTY_UPLOAD", "NOT_DICOM"}), sendable=False),
        c("random_4k", np.random.default_rng(8).bytes(4096), frozenset({"NOT_DICOM"}), sendable=False),
        c("text", b"this is a report, not an image\n" * 10, frozenset({"NOT_DICOM"}), sendable=False),
        c("png_radiograph", src.raw(PNG), frozenset({"NOT_DICOM"}), sendable=False),
        c("dicm_magic_corrupted", nih[:128] + b"DICX" + nih[132:], frozenset({"NOT_DICOM"}), sendable=False),
        # -- truncated at several offsets ----------------------------------------------------------------------
        c("cut_in_preamble", nih[:100], frozenset({"NOT_DICOM"}), sendable=False),
        c("cut_in_file_meta", nih[:150], TRUNCATED, sendable=False),
        c("cut_after_file_meta", nih[: 132 + _meta_length(nih)], TRUNCATED, sendable=False),
        c("cut_in_header", nih[: pixels_at - 37], TRUNCATED | {"NO_PIXEL_DATA"}, note="may end on an element"),
        c("cut_in_pixel_data_header", nih[: pixels_at + 6], TRUNCATED),
        c("cut_at_10pct_pixels", nih[: pixels_at + 100_000], TRUNCATED),
        c("cut_one_byte_short", nih[:-1], TRUNCATED),
        c("cut_jpeg_mid_fragment", siim[: len(siim) // 2], TRUNCATED),
        c("cut_jpeg2000_codestream", j2k[: int(len(j2k) * 0.6)], TRUNCATED),
        # -- corrupted headers and lengths ---------------------------------------------------------------------
        c("pixel_length_past_end", _set_length_at(nih, pixels_at, True, len(nih)), TRUNCATED),
        c(
            "pixel_data_half_length",
            _set_length_at(nih, pixels_at, True, (len(nih) - pixels_at - 8) // 2),
            MALFORMED | {"OK"},
            note="a shorter Pixel Data followed by garbage elements",
        ),  # fmt: skip
        c(
            "rows_doubled",
            _fresh(src, NIH, lambda d: setattr(d, "Rows", 2048)),
            frozenset({"PIXEL_DATA_SIZE_MISMATCH"}),
        ),  # fmt: skip
        c("rows_zero", _fresh(src, NIH, lambda d: setattr(d, "Rows", 0)), frozenset({"BAD_DIMENSIONS"})),
        c(
            "bits_allocated_12",
            _fresh(src, NIH, lambda d: setattr(d, "BitsAllocated", 12)),
            frozenset({"BAD_BIT_DEPTH"}),
        ),  # fmt: skip
        c("bits_stored_0", _fresh(src, NIH, lambda d: setattr(d, "BitsStored", 0)), frozenset({"BAD_BIT_DEPTH"})),
        c(
            "huge_declared_dimensions",
            _fresh(src, NIH, _huge_dimensions),
            frozenset({"TOO_LARGE"}),
        ),  # fmt: skip
        c("frames_declared_not_present", _multi_frame(src, 5, 1), frozenset({"PIXEL_DATA_SIZE_MISMATCH"})),
        c(
            "sop_instance_uid_missing",
            _fresh(src, NIH, lambda d: delattr(d, "SOPInstanceUID")),
            frozenset({"MISSING_SOP_INSTANCE_UID"}),
            sendable=False,
        ),  # fmt: skip
        c(
            "modality_ct", _fresh(src, NIH, lambda d: setattr(d, "Modality", "CT")), frozenset({"UNSUPPORTED_MODALITY"})
        ),  # fmt: skip
        c(
            "modality_missing", _fresh(src, NIH, lambda d: delattr(d, "Modality")), frozenset({"UNSUPPORTED_MODALITY"})
        ),  # fmt: skip
        c("lateral_view", _fresh(src, NIH, lambda d: setattr(d, "ViewPosition", "LL")), frozenset({"LATERAL_VIEW"})),
        c("sequence_nesting_200", _deep_sequences(src, 200), frozenset({OK, "MALFORMED_DICOM"}), same_as=NIH),
        c("trailing_garbage", nih + np.random.default_rng(3).bytes(3000), MALFORMED | {OK}),
        c("deflate_bomb_2gib", _zlib_bomb(), frozenset({"TOO_LARGE"}), sendable=False),
        # -- missing or wrong transfer syntax ------------------------------------------------------------------
        c("transfer_syntax_missing", _without_transfer_syntax(src), frozenset({OK}), same_as=NIH, sendable=False),
        c(
            "transfer_syntax_unknown",
            _declared(src, NIH, "1.2.3.4.5.6.7"),
            frozenset({"UNSUPPORTED_TRANSFER_SYNTAX", "MALFORMED_DICOM"}),
            sendable=False,
        ),  # fmt: skip
        c("jpeg_declared_on_raw_pixels", _jpeg_declared_on_raw(src), MALFORMED | {"UNSUPPORTED_TRANSFER_SYNTAX"}),
        c(
            "explicit_declared_on_implicit",
            _declared(src, NIH, ExplicitVRLittleEndian),
            MALFORMED | {OK, "BAD_SOURCE_DICOM"},
            note="pydicom reads the body as implicit VR; over DICOM the results cannot reference its header",
        ),
        c("jpeg_scan_zeroed", _jpeg_with_zeroed_scan(src), MALFORMED | {OK}),
        c("deflated", _deflated(src), frozenset({OK}), same_as=NIH),
        c("bare_dataset_no_preamble", _raw_dataset(src), frozenset({OK}), same_as=NIH, sendable=False),
        # -- unusual but valid (or refused by policy) ----------------------------------------------------------
        c("multi_frame_3", _multi_frame(src, 3, 3), frozenset({OK}), same_as=NIH),
        c("rgb", _rgb(src), frozenset({"UNSUPPORTED_PHOTOMETRIC_INTERPRETATION"})),
        c("palette_color", _palette(src), frozenset({"UNSUPPORTED_PHOTOMETRIC_INTERPRETATION"})),
        c("signed_16bit", _signed(src), frozenset({OK}), same_as=NIH),
        c("monochrome1_inverted", _monochrome1(src), frozenset({OK}), same_as=NIH),
        c("float_pixel_data", _float_pixels(src), frozenset({"NO_PIXEL_DATA"})),
        c("no_pixels", _fresh(src, HEADER_ONLY), frozenset({"NO_PIXEL_DATA"})),
        c("implicit_vr_original", nih, frozenset({OK}), same_as=NIH),
    ]


def reference(dicom_dir: Path, name: str) -> bytes:
    """The real file a ``same_as`` refers to, with a fresh SOP Instance UID (analysed anew, never cached)."""
    return _fresh(_Sources(dicom_dir, None), name)
