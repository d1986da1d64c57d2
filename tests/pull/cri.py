"""A CRI `runtime.v1.ImageService/PullImage` call by raw gRPC: Debian ships no CRI protos, and
the request is two nested string fields, so it is encoded by hand."""

from __future__ import annotations

import grpc

PULL_IMAGE = "/runtime.v1.ImageService/PullImage"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string_field_1(value: bytes) -> bytes:
    # field number 1, wire type 2 (length-delimited) -> tag byte 0x0a
    return b"\x0a" + _varint(len(value)) + value


def pull_image_request(image: str) -> bytes:
    """PullImageRequest{image: ImageSpec{image: image}} (auth and sandbox config left empty)."""
    return _string_field_1(_string_field_1(image.encode()))


def parse_pull_image_response(data: bytes) -> str:
    """PullImageResponse{image_ref = 1}: the image ID (config digest) CRI reports."""
    if not data:
        return ""
    if data[0] != 0x0A:
        raise ValueError(f"unexpected PullImageResponse field tag {data[0]:#x}")
    length, shift, pos = 0, 0, 1
    while True:
        byte = data[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
    return data[pos : pos + length].decode()


def cri_pull_image(containerd_socket: str, image: str, timeout: float = 300.0) -> str:
    """Ask containerd's CRI plugin to pull image; returns the image_ref CRI answers with."""
    with grpc.insecure_channel(f"unix://{containerd_socket}") as channel:
        # No (de)serializers: raw bytes both ways.
        call = channel.unary_unary(PULL_IMAGE, request_serializer=None, response_deserializer=None)
        response: bytes = call(pull_image_request(image), timeout=timeout)
    return parse_pull_image_response(response)
