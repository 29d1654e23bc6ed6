"""The frame-header scanner and its limits (``agentcast._frames``): pure, synchronous tests.

Every frame here is built byte by byte, so the tests can also build the frames no client
library would send (unmasked, reserved bits, bad lengths)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcast import Config
from agentcast._frames import FrameLimits, FrameScanner, TokenBucket
from agentcast._protocol import CloseCode

from .rawws import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, encode_frame

LIMITS = FrameLimits(
    max_fragments_per_message=8, control_frames_per_second=2.0, control_frames_burst=4,
    inbound_bytes_per_second=1000.0, inbound_bytes_burst=4000, inbound_frames_per_second=10.0,
    inbound_frames_burst=50,
)


def raw_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True, rsv: int = 0,
    length_code: int | None = None,
) -> bytes:
    """A frame with every header field under the test's control (``length_code`` forces the
    7-bit length field to 126 or 127 even for short payloads)."""
    length = len(payload)
    code = length_code or (length if length < 126 else 126 if length < 1 << 16 else 127)
    head = bytes([(0x80 if fin else 0) | rsv | opcode, (0x80 if masked else 0) | code])
    if code == 126:
        head += struct.pack("!H", length)
    elif code == 127:
        head += struct.pack("!Q", length)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def scanner(limits: FrameLimits = LIMITS) -> FrameScanner:
    return FrameScanner.create(limits, now=0.0)


def test_limits_come_from_the_config() -> None:
    config = Config(max_fragments_per_message=3, control_frames_per_second=1.5,
                    control_frames_burst=7, inbound_bytes_per_second=10.0,
                    inbound_bytes_burst=20, inbound_frames_per_second=30.0,
                    inbound_frames_burst=40)
    assert FrameLimits.from_config(config) == FrameLimits(3, 1.5, 7, 10.0, 20, 30.0, 40)


def test_config_refuses_non_positive_limits() -> None:
    with pytest.raises(ValueError, match="max_fragments_per_message must be > 0"):
        Config(max_fragments_per_message=0)


def test_valid_frames_pass_unchanged_and_are_counted() -> None:
    data = (
        encode_frame(TEXT, b"hello")
        + encode_frame(TEXT, b"a" * 200, fin=False) + encode_frame(PING, b"p")
        + encode_frame(CONTINUATION, b"b" * 70000)
        + encode_frame(BINARY, b"")
    )
    scan = scanner()
    assert scan.feed(data, 0.0) == data
    assert scan.violation is None
    counts = scan.counts()
    assert (counts.bytes, counts.frames, counts.control_frames, counts.messages) == (
        len(data), 5, 1, 3
    )


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[bytes]:
    """Valid client frames: messages of 1..8 fragments, control frames between any two."""
    frames: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        parts = draw(st.lists(st.binary(max_size=300), min_size=1, max_size=8))
        for index, part in enumerate(parts):
            if draw(st.booleans()):
                frames.append(encode_frame(draw(st.sampled_from([PING, PONG])), b"x"))
            opcode = (TEXT if draw(st.booleans()) else BINARY) if index == 0 else CONTINUATION
            frames.append(encode_frame(opcode, part, fin=index == len(parts) - 1))
    if draw(st.booleans()):
        frames.append(encode_frame(TEXT, b"y" * draw(st.integers(126, 70000))))
    return frames


@given(frame_sequences(), st.lists(st.integers(0, 80000), max_size=20))
def test_any_split_of_valid_frames_gives_the_same_bytes_and_counts(
    frames: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(frames)
    whole = FrameScanner.create(
        FrameLimits(8, 1.0, 1000, 1.0, 1, 1.0, 1), now=0.0
    )
    assert whole.feed(data, 0.0) == data
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    split = FrameScanner.create(FrameLimits(8, 1.0, 1000, 1.0, 1, 1.0, 1), now=0.0)
    passed = b"".join(
        split.feed(data[a:b], 0.0) for a, b in zip([0, *points], [*points, len(data)], strict=True)
    )
    assert passed == data
    assert split.counts() == whole.counts()
    assert whole.violation is None
    assert split.violation is None
    assert whole.counts().frames == len(frames)


def test_a_header_split_over_many_chunks_is_held_back_until_whole() -> None:
    frame = encode_frame(TEXT, b"z" * 300)  # 2 + 2 + 4 header bytes
    scan = scanner()
    assert [scan.feed(frame[i:i + 1], 0.0) for i in range(7)] == [b""] * 7
    assert scan.feed(frame[7:], 0.0) == frame


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param(raw_frame(TEXT, b"hi", masked=False), "masked", id="unmasked"),
        pytest.param(raw_frame(TEXT, b"hi", rsv=0x40), "reserved", id="rsv1"),
        pytest.param(raw_frame(TEXT, b"hi", rsv=0x10), "reserved", id="rsv3"),
        pytest.param(raw_frame(0x3, b"hi"), "opcode 0x3", id="opcode-3"),
        pytest.param(raw_frame(0xB, b"hi"), "opcode 0xb", id="opcode-b"),
        pytest.param(raw_frame(PING, b"hi", fin=False), "fragmented control", id="frag-ping"),
        pytest.param(raw_frame(PING, b"x" * 126), "control frame of 126", id="big-ping"),
        pytest.param(raw_frame(CLOSE, b"x" * 200), "control frame of 200", id="big-close"),
        pytest.param(raw_frame(CONTINUATION, b"hi"), "without a start", id="orphan-cont"),
        pytest.param(raw_frame(TEXT, b"hi", length_code=126), "minimally", id="len16-short"),
        pytest.param(raw_frame(TEXT, b"hi", length_code=127), "minimally", id="len64-short"),
    ],
)
def test_a_frame_breaking_rfc6455_is_a_protocol_error(bad: bytes, reason: str) -> None:
    good = encode_frame(TEXT, b"fine")
    scan = scanner()
    assert scan.feed(good + bad + good, 0.0) == good  # nothing from the bad frame on
    assert scan.violation is not None
    assert scan.violation.close_code is CloseCode.PROTOCOL_ERROR
    assert int(scan.violation.close_code) == 1002
    assert reason in scan.violation.reason


def test_a_new_data_frame_inside_a_fragmented_message_is_a_protocol_error() -> None:
    start = encode_frame(TEXT, b"part", fin=False)
    scan = scanner()
    assert scan.feed(start + encode_frame(TEXT, b"new"), 0.0) == start
    assert scan.violation is not None
    assert scan.violation.close_code == 1002
    assert "inside a fragmented message" in scan.violation.reason


def test_a_64bit_length_with_the_top_bit_set_is_a_protocol_error() -> None:
    head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 63) + os.urandom(4)
    scan = scanner()
    assert scan.feed(head + b"abc", 0.0) == b""
    assert scan.violation is not None
    assert scan.violation.close_code == 1002


def test_the_fragment_cap_allows_its_count_and_refuses_one_more() -> None:
    allowed = [encode_frame(TEXT, b"a", fin=False)] + [
        encode_frame(CONTINUATION, b"a", fin=False) for _ in range(6)
    ] + [encode_frame(CONTINUATION, b"a")]  # 8 fragments, one message
    scan = scanner()
    data = b"".join(allowed)
    assert scan.feed(data, 0.0) == data
    assert scan.violation is None
    over = [encode_frame(TEXT, b"a", fin=False)] + [
        encode_frame(CONTINUATION, b"a", fin=False) for _ in range(8)
    ]
    first_eight = b"".join(over[:8])
    assert scan.feed(b"".join(over), 0.0) == first_eight
    assert scan.violation is not None
    assert scan.violation.close_code == CloseCode.POLICY_VIOLATION == 1008
    assert "more than 8 fragments" in scan.violation.reason


def test_control_frames_past_the_burst_are_rate_limited_and_refill_over_time() -> None:
    ping = encode_frame(PING, b"p")
    scan = scanner()
    assert scan.feed(ping * 4, 0.0) == ping * 4  # the burst
    assert scan.feed(ping, 1.0) == ping  # 2 per second refilled
    assert scan.feed(ping, 1.0) == ping
    assert scan.violation is None
    assert scan.feed(ping * 2, 1.0) == b""
    assert scan.violation is not None
    assert scan.violation.close_code == CloseCode.RATE_LIMITED == 4029


def test_after_a_violation_nothing_more_passes_or_is_parsed() -> None:
    scan = scanner()
    bad = raw_frame(TEXT, b"hi", masked=False)
    later = encode_frame(TEXT, b"x" * 1000) + encode_frame(PING, b"")
    assert scan.feed(bad + later[:500], 0.0) == b""
    counted = scan.counts()
    assert scan.feed(later[500:] + encode_frame(CLOSE, struct.pack("!H", 1000)), 0.0) == b""
    assert scan.counts() == counted  # not even scanned: a flood after it costs nothing
    # The first violation stays the reason, whatever follows it.
    assert scan.violation is not None
    assert "masked" in scan.violation.reason


def test_a_violation_in_a_split_header_passes_none_of_it() -> None:
    good = encode_frame(TEXT, b"ok")
    bad = raw_frame(TEXT, b"x" * 300, masked=False)  # 4 header bytes
    scan = scanner()
    assert scan.feed(good + bad[:3], 0.0) == good
    assert scan.feed(bad[3:], 0.0) == b""
    assert scan.violation is not None


def test_token_bucket_charges_into_debt_and_says_how_long_to_wait() -> None:
    bucket = TokenBucket.full(rate=100.0, capacity=50.0, now=0.0)
    assert bucket.delay(0.0) == 0.0
    bucket.charge(250, 0.0)  # 200 in debt
    assert bucket.delay(0.0) == pytest.approx(2.01)
    assert bucket.delay(1.0) == pytest.approx(1.01)
    assert bucket.delay(3.0) == 0.0
    assert bucket.tokens == 50.0  # never above capacity
    assert not bucket.take(51, 3.0)
    assert bucket.take(50, 3.0)
    assert bucket.delay(3.0, want=20) == pytest.approx(0.2)
    assert bucket.delay(3.0, want=500) == pytest.approx(0.5)  # capped at the capacity
    assert bucket.delay(10.0, want=20) == 0.0
    assert bucket.available(10.0) == 50.0


def test_the_benchmark_floods_are_what_the_default_limits_stop() -> None:
    """benchmarks/flooder.py's floods against the default limits: the fragment and ping floods
    are closed (1008, 4029), the tiny-frame flood is exactly within the fragment cap."""
    from benchmarks.flooder import FRAGMENT_FLOOD, PING_FLOOD, TINY_MESSAGE

    defaults = FrameLimits.from_config(Config())
    fragments = FrameScanner.create(defaults, now=0.0)
    assert fragments.feed(FRAGMENT_FLOOD, 0.0) == FRAGMENT_FLOOD[:64 * 7]
    assert fragments.violation is not None
    assert fragments.violation.close_code == 1008
    pings = FrameScanner.create(defaults, now=0.0)
    assert len(pings.feed(PING_FLOOD, 0.0)) == 20 * 7
    assert pings.violation is not None
    assert pings.violation.close_code == 4029
    tiny = FrameScanner.create(defaults, now=0.0)
    assert tiny.feed(TINY_MESSAGE * 3, 0.0) == TINY_MESSAGE * 3
    assert tiny.counts().messages == 3
    assert tiny.counts().frames == 3 * 64
