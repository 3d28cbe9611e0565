"""ScanNet ``.sens`` RGB-D streams: a reader (lazy, frame by frame) and a writer (used by tests to build fixtures).

File layout (little-endian, version 4)::

    uint32  version (= 4)
    uint64  n; char[n] sensor name
    float32[16] intrinsic_color, extrinsic_color, intrinsic_depth, extrinsic_depth   (4x4 row-major each)
    int32   color compression   (-1 unknown, 0 raw, 1 png, 2 jpeg)
    int32   depth compression   (-1 unknown, 0 raw uint16, 1 zlib uint16, 2 occi)
    uint32  color width, color height, depth width, depth height
    float32 depth shift          (raw depth value / shift = metres; ScanNet: 1000)
    uint64  number of frames
    per frame:
        float32[16] camera-to-world pose (may hold -inf: tracking lost)
        uint64 colour timestamp, uint64 depth timestamp, uint64 colour bytes, uint64 depth bytes
        colour bytes (e.g. a JPEG file), depth bytes (e.g. zlib of a uint16 depth_height x depth_width image)
    uint64  number of IMU frames, then IMU frames (not read)

Every structural problem (wrong version, a frame running past the end of the file, a depth block that does not
decompress to the announced size) raises :class:`haskd.errors.InputError` naming the file and the frame.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..errors import InputError

SENS_VERSION = 4
COLOR_COMPRESSION = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}
_FRAME_HEAD = struct.Struct("<16f4Q")   # pose, ts_color, ts_depth, color bytes, depth bytes
_SIZES = struct.Struct("<2i4IfQ")      # compressions, 4 sizes, depth shift, frame count
# Sanity limits: a header beyond them is a corrupt file, not a big sensor.
_MAX_NAME = 4096
_MAX_SIDE = 1 << 15


@dataclass
class SensHeader:
    sensor_name: str
    intrinsic_color: np.ndarray   # (4, 4) float32
    extrinsic_color: np.ndarray   # (4, 4) float32
    intrinsic_depth: np.ndarray   # (4, 4) float32
    extrinsic_depth: np.ndarray   # (4, 4) float32
    color_compression: str        # "jpeg" for ScanNet
    depth_compression: str        # "zlib_ushort" for ScanNet
    color_width: int
    color_height: int
    depth_width: int
    depth_height: int
    depth_shift: float
    num_frames: int
    version: int = SENS_VERSION


@dataclass
class SensFrame:
    index: int
    pose: np.ndarray              # (4, 4) float32 camera-to-world, may be non-finite
    timestamp_color: int
    timestamp_depth: int
    color_bytes: Optional[bytes]  # None when the reader was asked to skip colour
    depth_bytes: Optional[bytes]

    @property
    def pose_ok(self) -> bool:
        return bool(np.isfinite(self.pose).all())


class SensReader:
    """Read a ``.sens`` file frame by frame without loading it whole.

    >>> with SensReader(path) as r:
    ...     r.header.num_frames
    ...     for f in r.frames(every=20):
    ...         depth = r.decode_depth(f)      # (depth_height, depth_width) uint16
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "missing file")
        self._f = open(self.path, "rb")
        self._size = self.path.stat().st_size
        try:
            self.header = self._read_header()
        except BaseException:
            self._f.close()
            raise
        self._data_start = self._f.tell()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._f.close()

    def _read(self, n: int, what: str) -> bytes:
        b = self._f.read(n)
        if len(b) != n:
            raise InputError(self.path, f"truncated .sens: {what} needs {n} bytes, file ends after {len(b)}")
        return b

    def _read_header(self) -> SensHeader:
        (version,) = struct.unpack("<I", self._read(4, "version"))
        if version != SENS_VERSION:
            raise InputError(self.path, f"not a .sens v{SENS_VERSION} file (version field = {version})")
        (n,) = struct.unpack("<Q", self._read(8, "sensor name length"))
        if n > _MAX_NAME:
            raise InputError(self.path, f"corrupt .sens header (sensor name length {n})")
        name = self._read(n, "sensor name").decode("utf-8", errors="replace")
        mats = np.frombuffer(self._read(4 * 64, "calibration"), dtype="<f4").reshape(4, 4, 4).astype(np.float32)
        cc, dc, cw, ch, dw, dh, shift, nf = _SIZES.unpack(self._read(_SIZES.size, "image sizes"))
        if cc not in COLOR_COMPRESSION or dc not in DEPTH_COMPRESSION:
            raise InputError(self.path, f"corrupt .sens header (compression types {cc}, {dc})")
        if not (0 < cw <= _MAX_SIDE and 0 < ch <= _MAX_SIDE and 0 < dw <= _MAX_SIDE and 0 < dh <= _MAX_SIDE):
            raise InputError(self.path, f"corrupt .sens header (image sizes {cw}x{ch}, {dw}x{dh})")
        if not np.isfinite(shift) or shift <= 0:
            raise InputError(self.path, f"corrupt .sens header (depth shift {shift})")
        if nf * _FRAME_HEAD.size > self._size:
            raise InputError(self.path, f"truncated or corrupt .sens: header announces {nf} frames, "
                                        f"file has only {self._size} bytes")
        return SensHeader(name, mats[0], mats[1], mats[2], mats[3], COLOR_COMPRESSION[cc],
                          DEPTH_COMPRESSION[dc], cw, ch, dw, dh, float(shift), int(nf), version)

    def frames(self, every: int = 1, color: bool = True) -> Iterator[SensFrame]:
        """Yield frames 0, every, 2*every, ... ; the others are seeked over (their bytes are never read)."""
        every = max(1, int(every))
        self._f.seek(self._data_start)
        for i in range(self.header.num_frames):
            head = self._read(_FRAME_HEAD.size, f"frame {i} header")
            vals = _FRAME_HEAD.unpack(head)
            pose = np.array(vals[:16], dtype=np.float32).reshape(4, 4)
            ts_c, ts_d, nc, nd = vals[16:]
            if self._f.tell() + nc + nd > self._size:
                raise InputError(self.path, f"truncated .sens: frame {i} needs {nc + nd} bytes of image data, "
                                            f"file ends after {self._size - self._f.tell()}")
            if i % every:
                self._f.seek(nc + nd, 1)
                continue
            if color:
                cb = self._read(nc, f"frame {i} colour")
            else:
                self._f.seek(nc, 1)
                cb = None
            db = self._read(nd, f"frame {i} depth")
            yield SensFrame(i, pose, int(ts_c), int(ts_d), cb, db)

    def decode_depth(self, frame: SensFrame) -> np.ndarray:
        """(depth_height, depth_width) uint16 raw depth (divide by ``header.depth_shift`` for metres)."""
        h = self.header
        n = h.depth_width * h.depth_height * 2
        if h.depth_compression == "zlib_ushort":
            try:
                raw = zlib.decompress(frame.depth_bytes)
            except zlib.error as e:
                raise InputError(self.path, f"corrupt depth in frame {frame.index} ({e})") from None
        elif h.depth_compression == "raw_ushort":
            raw = frame.depth_bytes
        else:
            raise InputError(self.path, f"unsupported depth compression '{h.depth_compression}'")
        if len(raw) != n:
            raise InputError(self.path, f"corrupt depth in frame {frame.index}: {len(raw)} bytes, "
                                        f"expected {n} for {h.depth_width}x{h.depth_height}")
        return np.frombuffer(raw, dtype="<u2").reshape(h.depth_height, h.depth_width).copy()

    def decode_color(self, frame: SensFrame) -> np.ndarray:
        """(color_height, color_width, 3) uint8."""
        import io

        from PIL import Image

        h = self.header
        if h.color_compression == "raw":
            a = np.frombuffer(frame.color_bytes, dtype=np.uint8)
            if a.size != h.color_width * h.color_height * 3:
                raise InputError(self.path, f"corrupt colour in frame {frame.index}")
            return a.reshape(h.color_height, h.color_width, 3).copy()
        try:
            return np.asarray(Image.open(io.BytesIO(frame.color_bytes)).convert("RGB"))
        except Exception as e:
            raise InputError(self.path, f"corrupt colour image in frame {frame.index} ({e})") from None


def write_sens(path, header: SensHeader, frames: Iterable[dict], compress_level: int = 6) -> Path:
    """Write a ``.sens`` file. ``frames``: dicts with ``pose`` (4,4), ``color_bytes`` (already encoded, e.g. JPEG),
    ``depth`` (depth_height, depth_width) uint16, optional ``timestamp_color`` / ``timestamp_depth``.
    ``header.num_frames`` is ignored: the count written is the number of frames given."""
    inv_c = {v: k for k, v in COLOR_COMPRESSION.items()}
    inv_d = {v: k for k, v in DEPTH_COMPRESSION.items()}
    frames = list(frames)
    path = Path(path)
    with open(path, "wb") as f:
        name = header.sensor_name.encode()
        f.write(struct.pack("<IQ", header.version, len(name)))
        f.write(name)
        for m in (header.intrinsic_color, header.extrinsic_color, header.intrinsic_depth, header.extrinsic_depth):
            f.write(np.asarray(m, dtype="<f4").reshape(16).tobytes())
        f.write(_SIZES.pack(inv_c[header.color_compression], inv_d[header.depth_compression], header.color_width,
                            header.color_height, header.depth_width, header.depth_height, header.depth_shift,
                            len(frames)))
        for i, fr in enumerate(frames):
            depth = np.ascontiguousarray(fr["depth"], dtype="<u2")
            if depth.shape != (header.depth_height, header.depth_width):
                raise ValueError(f"frame {i}: depth shape {depth.shape} != header "
                                 f"({header.depth_height}, {header.depth_width})")
            db = zlib.compress(depth.tobytes(), compress_level) if header.depth_compression == "zlib_ushort" \
                else depth.tobytes()
            cb = bytes(fr["color_bytes"])
            pose = np.asarray(fr["pose"], dtype="<f4").reshape(16)
            f.write(_FRAME_HEAD.pack(*pose.tolist(), int(fr.get("timestamp_color", i)),
                                     int(fr.get("timestamp_depth", i)), len(cb), len(db)))
            f.write(cb)
            f.write(db)
        f.write(struct.pack("<Q", 0))  # no IMU frames
    return path
