"""Envoy's rate-limit service messages (envoy.service.ratelimit.v3), encoded and decoded by
hand: a few protobuf fields, so the tests need only grpcio, not a protobuf compiler.
Field numbers: envoy/service/ratelimit/v3/rls.proto and
envoy/extensions/common/ratelimit/v3/ratelimit.proto."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
OK, OVER_LIMIT = 1, 2
UNITS = {1: 1, 2: 60, 3: 3600, 4: 86400, 5: 30 * 86400, 6: 365 * 86400, 7: 7 * 86400}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len(tag: int, data: bytes) -> bytes:
    return _varint(tag << 3 | 2) + _varint(len(data)) + data


def _uint(tag: int, n: int) -> bytes:
    return _varint(tag << 3) + _varint(n) if n else b""


def descriptor(entries: list[tuple[str, str]], hits: int | None = None) -> bytes:
    out = b"".join(_len(1, _len(1, k.encode()) + _len(2, v.encode())) for k, v in entries)
    if hits is not None:
        out += _len(3, _uint(1, hits))  # google.protobuf.UInt64Value
    return out


def request(domain: str, descriptors: list, hits: int = 0) -> bytes:
    """`descriptors`: lists of (key, value) entries, or bytes from `descriptor()`."""
    out = _len(1, domain.encode())
    for d in descriptors:
        out += _len(2, d if isinstance(d, bytes) else descriptor(d))
    return out + _uint(3, hits)


def fields(data: bytes):
    """(field number, value) pairs of one message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        tag, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(data, i)
        elif wire == 2:
            n, i = _read_varint(data, i)
            v, i = data[i:i + n], i + n
        elif wire == 5:
            v, i = data[i:i + 4], i + 4
        elif wire == 1:
            v, i = data[i:i + 8], i + 8
        else:
            raise ValueError(f"wire type {wire}")
        yield tag, v


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


@dataclass
class Status:
    code: int = 0
    limit: int | None = None        # current_limit.requests_per_unit
    unit_seconds: int | None = None
    remaining: int = 0
    reset_s: float | None = None    # duration_until_reset, seconds


@dataclass
class Answer:
    code: int = 0
    statuses: list[Status] = field(default_factory=list)

    @property
    def over(self) -> bool:
        return self.code == OVER_LIMIT


def decode(data: bytes) -> Answer:
    a = Answer()
    for tag, v in fields(data):
        if tag == 1:
            a.code = v
        elif tag == 2:
            s = Status()
            for t, x in fields(v):
                if t == 1:
                    s.code = x
                elif t == 2:
                    for t2, y in fields(x):
                        if t2 == 1:
                            s.limit = y
                        elif t2 == 2:
                            s.unit_seconds = UNITS.get(y)
                    s.limit = s.limit or 0
                elif t == 3:
                    s.remaining = x
                elif t == 4:
                    secs = nanos = 0
                    for t2, y in fields(x):
                        if t2 == 1:
                            secs = y
                        elif t2 == 2:
                            nanos = y
                    s.reset_s = secs + nanos / 1e9
            a.statuses.append(s)
    return a


class Client:
    """A gRPC channel to one service address."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.channel = grpc.insecure_channel(f"{host}:{port}")
        self.call = self.channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

    def ask(self, domain: str, descriptors: list, hits: int = 0, timeout: float = 5.0) -> Answer:
        return decode(self.call(request(domain, descriptors, hits), timeout=timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
