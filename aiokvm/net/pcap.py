"""Classic libpcap capture files, for handing frames to Wireshark / tshark.

File layout (the pcap format as documented by tcpdump.org and the IETF
draft-ietf-opsawg-pcap): a 24-byte global header -- magic u32, version major
u16 and minor u16, thiszone i32, sigfigs u32, snaplen u32, link type u32 --
then records, each a 16-byte header (seconds u32, fraction u32, captured
length u32, original length u32) and the captured bytes.  The magic tells
both the writer's byte order and the timestamp resolution: 0xa1b2c3d4 for
microseconds, 0xa1b23c4d for nanoseconds.

:class:`PcapWriter` writes little-endian, microsecond files with link type 1
(Ethernet).  :class:`PcapReader` reads either byte order and either
resolution.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

MAGIC_USEC = 0xA1B2C3D4
MAGIC_NSEC = 0xA1B23C4D
VERSION = (2, 4)
SNAPLEN = 262144
LINKTYPE_ETHERNET = 1

_GLOBAL = struct.Struct("IHHiIII")  # byte order prefixed per file
_RECORD = struct.Struct("IIII")
_U32_LIMIT = 1 << 32
_MAX_RECORD = 1 << 24  # refuse absurd record lengths rather than allocate them


class PcapError(ValueError):
    """A malformed or truncated capture file; the message is one line."""


def _open(file_or_path: str | os.PathLike[str] | BinaryIO, mode: str) -> tuple[BinaryIO, bool]:
    if isinstance(file_or_path, str | bytes | os.PathLike):
        return open(file_or_path, mode), True  # noqa: SIM115 -- closed by close()
    return file_or_path, False


class PcapWriter:
    """Write frames to a classic pcap file (a path, or a binary file object
    which stays open after :meth:`close`).  The global header is written at once."""

    def __init__(
        self,
        file_or_path: str | os.PathLike[str] | BinaryIO,
        *,
        snaplen: int = SNAPLEN,
        linktype: int = LINKTYPE_ETHERNET,
    ) -> None:
        if not 0 < snaplen < _U32_LIMIT:
            raise ValueError(f"snaplen {snaplen} is not a positive 32-bit value")
        self.snaplen = snaplen
        self.linktype = linktype
        self._file, self._owned = _open(file_or_path, "wb")
        self._closed = False
        header = struct.Struct("<" + _GLOBAL.format)
        self._file.write(header.pack(MAGIC_USEC, *VERSION, 0, 0, snaplen, linktype))
        self._record = struct.Struct("<" + _RECORD.format)

    def write(self, frame: bytes, timestamp: float) -> None:
        """Append one frame captured at ``timestamp`` (seconds since the epoch,
        microsecond resolution); frames longer than snaplen are cut."""
        if self._closed:
            raise ValueError("write to a closed PcapWriter")
        if not 0 <= timestamp < _U32_LIMIT:
            raise ValueError(f"timestamp {timestamp} does not fit a pcap record")
        micros = round(timestamp * 1_000_000)
        seconds, micros = divmod(micros, 1_000_000)
        if seconds >= _U32_LIMIT:
            raise ValueError(f"timestamp {timestamp} does not fit a pcap record")
        data = bytes(frame)
        captured = data[: self.snaplen]
        self._file.write(self._record.pack(seconds, micros, len(captured), len(data)))
        self._file.write(captured)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owned:
            self._file.close()
        else:
            self._file.flush()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PcapReader:
    """Iterate ``(timestamp, frame)`` over a classic pcap file.

    The global header is read and checked on construction; records as they
    are iterated.  Attributes: ``byte_order`` ("<" or ">"), ``nanosecond``,
    ``version``, ``snaplen``, ``linktype``."""

    def __init__(self, file_or_path: str | os.PathLike[str] | BinaryIO) -> None:
        self._file, self._owned = _open(file_or_path, "rb")
        try:
            self._read_global_header()
        except BaseException:
            self.close()
            raise

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._file.read(n)
        if len(data) != n:
            raise PcapError(f"truncated pcap file: {what} has {len(data)} of {n} bytes")
        return data

    def _read_global_header(self) -> None:
        raw = self._read_exact(_GLOBAL.size, "global header")
        for order in ("<", ">"):
            (magic,) = struct.unpack_from(order + "I", raw)
            if magic in (MAGIC_USEC, MAGIC_NSEC):
                break
        else:
            raise PcapError(f"not a classic pcap file: magic {raw[:4].hex()}")
        self.byte_order = order
        self.nanosecond = magic == MAGIC_NSEC
        _, major, minor, _zone, _sigfigs, self.snaplen, self.linktype = struct.unpack(order + _GLOBAL.format, raw)
        if major != VERSION[0]:
            raise PcapError(f"unsupported pcap version {major}.{minor}")
        self.version = (major, minor)
        self._record = struct.Struct(order + _RECORD.format)
        self._divisor = 1_000_000_000 if self.nanosecond else 1_000_000
        # Tools differ on whether records may exceed snaplen; allow up to the
        # usual 256 KiB regardless, and never more than 16 MiB.
        self._limit = min(max(self.snaplen, SNAPLEN), _MAX_RECORD)

    def __iter__(self) -> Iterator[tuple[float, bytes]]:
        while True:
            head = self._file.read(_RECORD.size)
            if not head:
                return
            if len(head) != _RECORD.size:
                raise PcapError(f"truncated pcap file: record header has {len(head)} of {_RECORD.size} bytes")
            seconds, fraction, captured, _original = self._record.unpack(head)
            if fraction >= self._divisor:
                unit = "nanoseconds" if self.nanosecond else "microseconds"
                raise PcapError(f"malformed pcap record: {fraction} {unit} in the fraction of a second")
            if captured > self._limit:
                raise PcapError(f"malformed pcap record: captured length {captured} exceeds the limit {self._limit}")
            frame = self._read_exact(captured, "record data")
            yield seconds + fraction / self._divisor, frame

    def close(self) -> None:
        if self._owned:
            self._file.close()

    def __enter__(self) -> PcapReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
