//! Just enough of the WebSocket framing (RFC 6455 §5.2) to relay a connection byte for byte
//! while the sidecar pings the client itself:
//! - [`FrameCursor`] follows frame boundaries of the application → client stream, so a ping can
//!   be slipped in between two frames;
//! - [`ClientFilter`] follows the client → application stream and removes the pongs that answer
//!   the sidecar's own pings (the application never sent those pings); on the way it tells its
//!   caller the size of each whole data message and whether the client sent a close frame
//!   ([`ClientFrame`], for session traces).
//!
//! Payloads are never decoded, unmasked or copied aside; only headers (≤ 14 bytes) and the
//! sidecar's own pong (≤ 14 + 8 bytes) are held between reads.

/// Length of a relay's ping payload; a client's pong echoes it.
pub(crate) const PING_LEN: usize = 8;
/// The payload a [`ClientFilter`] starts with (the sidecar's).
pub(crate) const PING_PAYLOAD: [u8; PING_LEN] = *b"spawner1";

const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PONG: u8 = 0xA;

/// What a client sent, as the relay saw it in the frame headers (payloads are never read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// A whole data message (text or binary, all its fragments): its payload size. Reported
    /// when the header of its last fragment has arrived.
    Message { bytes: u64 },
    /// A close frame.
    Close,
}
const MAX_HEADER: usize = 14;

/// Bytes that must be free in front of the data handed to [`ClientFilter::filter`].
pub(crate) const FILTER_HEADROOM: usize = MAX_HEADER + PING_LEN;

/// A relay's ping frame with `payload`, server → client (unmasked).
pub(crate) fn ping_frame(payload: &[u8; PING_LEN]) -> [u8; 2 + PING_LEN] {
    let mut frame = [0u8; 2 + PING_LEN];
    frame[0] = 0x80 | 0x9;
    frame[1] = PING_LEN as u8;
    frame[2..].copy_from_slice(payload);
    frame
}

/// A close frame with status 1001 (going away), client → server (masked, as clients must).
pub(crate) fn going_away_frame() -> [u8; 8] {
    let mask = [0x5a, 0xc3, 0x3c, 0xa5];
    let code = 1001u16.to_be_bytes();
    [
        0x80 | OPCODE_CLOSE,
        0x80 | 2,
        mask[0],
        mask[1],
        mask[2],
        mask[3],
        code[0] ^ mask[0],
        code[1] ^ mask[1],
    ]
}

/// Length of the header that starts with `b0, b1`.
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// Payload length of a complete header.
fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    }
}

/// Follows frame boundaries in one direction of a WebSocket.
#[derive(Debug, Default)]
pub(crate) struct FrameCursor {
    header: [u8; MAX_HEADER],
    header_have: u8,
    payload_left: u64,
}

impl FrameCursor {
    /// Between two frames: a control frame may be inserted here.
    pub fn at_boundary(&self) -> bool {
        self.header_have == 0 && self.payload_left == 0
    }

    /// Advances over bytes that are passed on unchanged.
    pub fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let have = usize::from(self.header_have);
            self.header[have] = data[0];
            data = &data[1..];
            let have = have + 1;
            if have >= 2 && have == header_len(self.header[1]) {
                self.payload_left = payload_len(&self.header[..have]);
                self.header_have = 0;
            } else {
                self.header_have = have as u8;
            }
        }
    }
}

/// Follows the client → application stream and drops the pongs answering the relay's own
/// pings (those with its payload: a relay in front of another, the router in front of a
/// sidecar, pings with another payload, and passes the pongs answering the other's on).
#[derive(Debug)]
pub(crate) struct ClientFilter {
    /// The payload of this relay's pings.
    payload: [u8; PING_LEN],
    /// The frame being read: its header, plus the payload when it may be our pong.
    held: [u8; FILTER_HEADROOM],
    held_len: usize,
    /// Once `held` is complete: bytes of `held` the frame has in total.
    held_target: usize,
    /// Payload bytes of the current frame still to pass through.
    payload_left: u64,
    /// Payload bytes of the fragments of the data message in progress.
    message_bytes: u64,
}

impl Default for ClientFilter {
    fn default() -> Self {
        Self {
            payload: PING_PAYLOAD,
            held: [0; FILTER_HEADROOM],
            held_len: 0,
            held_target: 0,
            payload_left: 0,
            message_bytes: 0,
        }
    }
}

impl ClientFilter {
    /// Pongs with `payload` are this relay's from now on.
    pub fn set_payload(&mut self, payload: [u8; PING_LEN]) {
        self.payload = payload;
    }

    /// Between two frames.
    pub fn at_boundary(&self) -> bool {
        self.held_len == 0 && self.payload_left == 0
    }

    /// A frame header is complete: report whole messages and closes.
    fn observe(&mut self, payload: u64, on_frame: &mut impl FnMut(ClientFrame)) {
        let first = self.held[0];
        match first & 0x0f {
            OPCODE_CONTINUATION | OPCODE_TEXT | OPCODE_BINARY => {
                self.message_bytes = self.message_bytes.saturating_add(payload);
                if first & 0x80 != 0 {
                    on_frame(ClientFrame::Message {
                        bytes: std::mem::take(&mut self.message_bytes),
                    });
                }
            }
            OPCODE_CLOSE => on_frame(ClientFrame::Close),
            _ => {}
        }
    }

    /// Filters `buf[start..end]` in place and returns the range to forward. `start` must be at
    /// least [`FILTER_HEADROOM`]: bytes held from an earlier read may be written before it.
    /// `on_frame` hears of every whole data message and close frame whose header completes.
    pub fn filter(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        on_frame: &mut impl FnMut(ClientFrame),
    ) -> (usize, usize) {
        debug_assert!(start >= FILTER_HEADROOM);
        // Fast path: the whole read is payload of a frame already being passed on.
        if self.payload_left >= (end - start) as u64 {
            self.payload_left -= (end - start) as u64;
            return (start, end);
        }
        // Held bytes of a frame begun earlier go in front of this read, if they are kept.
        let out_start = start - self.held_len;
        let mut w = out_start;
        let mut r = start;
        while r < end {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(end - r);
                buf.copy_within(r..r + n, w);
                w += n;
                r += n;
                self.payload_left -= n as u64;
                continue;
            }
            self.held[self.held_len] = buf[r];
            self.held_len += 1;
            r += 1;
            if self.held_len == 2 {
                self.held_target = header_len(self.held[1]);
            }
            if self.held_len < 2 || self.held_len < self.held_target {
                continue;
            }
            if self.held_len == header_len(self.held[1]) {
                let len = payload_len(&self.held[..self.held_len]);
                self.observe(len, on_frame);
                let masked = self.held[1] & 0x80 != 0;
                let may_be_ours =
                    self.held[0] & 0x0f == OPCODE_PONG && masked && len == PING_LEN as u64;
                if may_be_ours {
                    self.held_target = self.held_len + PING_LEN;
                    continue;
                }
                // Not ours: pass the header on, then the payload.
                buf[w..w + self.held_len].copy_from_slice(&self.held[..self.held_len]);
                w += self.held_len;
                self.held_len = 0;
                self.held_target = 0;
                self.payload_left = len;
                continue;
            }
            // A complete candidate pong: header (with mask) and payload.
            let header = self.held_len - PING_LEN;
            let mask = [
                self.held[header - 4],
                self.held[header - 3],
                self.held[header - 2],
                self.held[header - 1],
            ];
            let ours = self.held[header..self.held_len]
                .iter()
                .enumerate()
                .all(|(i, b)| b ^ mask[i % 4] == self.payload[i]);
            if !ours {
                buf[w..w + self.held_len].copy_from_slice(&self.held[..self.held_len]);
                w += self.held_len;
            }
            self.held_len = 0;
            self.held_target = 0;
        }
        (out_start, w)
    }
}

/// The fuzz target `ws_frames` (fuzz/, feature `fuzzing`): `data` is a chunking plan and a
/// client → application byte stream. The stream is filtered whole and in the planned chunks
/// (as reads would split it); both must forward the same bytes and report the same frames,
/// never panic, and the filter must end at a frame boundary exactly when a [`FrameCursor`]
/// over the same stream does.
#[cfg(feature = "fuzzing")]
pub fn fuzz_client_stream(data: &[u8]) {
    let Some((&plan_len, rest)) = data.split_first() else {
        return;
    };
    let plan_len = usize::from(plan_len % 8).min(rest.len());
    let (plan, wire) = rest.split_at(plan_len);

    let run = |chunks: &mut dyn Iterator<Item = usize>| {
        let mut filter = ClientFilter::default();
        let mut frames = Vec::new();
        let mut forwarded = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let n = chunks
                .next()
                .unwrap_or(wire.len())
                .clamp(1, wire.len() - at);
            let mut buf = vec![0u8; FILTER_HEADROOM + n];
            buf[FILTER_HEADROOM..].copy_from_slice(&wire[at..at + n]);
            let (from, to) =
                filter.filter(&mut buf, FILTER_HEADROOM, FILTER_HEADROOM + n, &mut |f| {
                    frames.push(f)
                });
            assert!(from <= to && to <= buf.len());
            forwarded.extend_from_slice(&buf[from..to]);
            at += n;
        }
        (forwarded, frames, filter.at_boundary())
    };
    let whole = run(&mut std::iter::empty());
    let mut planned = plan.iter().map(|&b| usize::from(b)).cycle();
    let chunked = run(&mut planned);
    assert_eq!(
        whole, chunked,
        "the split changed what was forwarded or reported"
    );

    let mut cursor = FrameCursor::default();
    cursor.advance(wire);
    assert_eq!(
        whole.2,
        cursor.at_boundary(),
        "filter and cursor disagree on the boundary"
    );
    // Only whole pongs of ours are taken out: the forwarded stream keeps the boundaries.
    let mut forwarded_cursor = FrameCursor::default();
    forwarded_cursor.advance(&whole.0);
    if cursor.at_boundary() {
        assert!(forwarded_cursor.at_boundary(), "a frame was cut");
    }
    assert!(whole.0.len() <= wire.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame (masked).
    fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        client_fragment(true, opcode, payload, mask)
    }

    /// A client frame, the last of its message (`fin`) or not.
    fn client_fragment(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len <= 0xffff {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn filter_in_pieces(filter: &mut ClientFilter, wire: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut last = 0;
        for &cut in cuts.iter().chain([wire.len()].iter()) {
            let piece = &wire[last..cut];
            let mut buf = vec![0u8; FILTER_HEADROOM + piece.len()];
            buf[FILTER_HEADROOM..].copy_from_slice(piece);
            let (a, b) = filter.filter(
                &mut buf,
                FILTER_HEADROOM,
                FILTER_HEADROOM + piece.len(),
                &mut |_| {},
            );
            out.extend_from_slice(&buf[a..b]);
            last = cut;
        }
        out
    }

    #[test]
    fn our_pongs_are_removed_and_everything_else_kept() {
        let text = client_frame(0x1, b"hello", [1, 2, 3, 4]);
        let our_pong = client_frame(OPCODE_PONG, &PING_PAYLOAD, [9, 8, 7, 6]);
        let app_pong = client_frame(OPCODE_PONG, b"app-ping", [9, 8, 7, 6]);
        let big = client_frame(0x2, &vec![7u8; 70_000], [5, 5, 5, 5]);
        let mid = client_frame(0x2, &vec![3u8; 300], [1, 1, 1, 1]);
        let wire: Vec<u8> = [&text[..], &our_pong, &big, &app_pong, &our_pong, &mid].concat();
        let expected: Vec<u8> = [&text[..], &big, &app_pong, &mid].concat();
        for cuts in [
            vec![],
            (1..wire.len()).collect::<Vec<_>>(),
            vec![3, 9, 12, 20, 100, 70_020, 70_030],
        ] {
            let mut filter = ClientFilter::default();
            assert_eq!(filter_in_pieces(&mut filter, &wire, &cuts), expected);
            assert!(filter.at_boundary());
        }
    }

    #[test]
    fn a_relay_in_front_of_another_passes_the_pongs_to_the_other_on() {
        // The router relays to a sidecar: the client's pongs to the sidecar's pings must reach
        // the sidecar (once the router ate them, and the sidecar dropped idle users as dead).
        let routers = *b"spawnerR";
        let to_router = client_frame(OPCODE_PONG, &routers, [9, 8, 7, 6]);
        let to_sidecar = client_frame(OPCODE_PONG, &PING_PAYLOAD, [4, 3, 2, 1]);
        let wire: Vec<u8> = [&to_router[..], &to_sidecar, &to_router].concat();
        let mut filter = ClientFilter::default();
        filter.set_payload(routers);
        assert_eq!(filter_in_pieces(&mut filter, &wire, &[5]), to_sidecar);
    }

    #[test]
    fn whole_messages_and_closes_are_reported_with_their_sizes() {
        let wire: Vec<u8> = [
            client_frame(OPCODE_TEXT, b"hello", [1, 2, 3, 4]),
            // A message in three fragments, a ping between two of them.
            client_fragment(false, OPCODE_BINARY, &[7; 300], [5, 5, 5, 5]),
            client_frame(0x9, b"app", [1, 1, 1, 1]),
            client_fragment(false, OPCODE_CONTINUATION, &[7; 70_000], [2, 2, 2, 2]),
            client_frame(OPCODE_PONG, &PING_PAYLOAD, [9, 8, 7, 6]),
            client_fragment(true, OPCODE_CONTINUATION, b"end", [3, 3, 3, 3]),
            client_frame(OPCODE_TEXT, b"", [4, 4, 4, 4]),
            client_frame(OPCODE_CLOSE, &1000u16.to_be_bytes(), [6, 6, 6, 6]),
        ]
        .concat();
        let expected = [
            ClientFrame::Message { bytes: 5 },
            ClientFrame::Message { bytes: 70_303 },
            ClientFrame::Message { bytes: 0 },
            ClientFrame::Close,
        ];
        for cuts in [
            vec![],
            (1..wire.len()).step_by(7).collect::<Vec<_>>(),
            vec![1, 2, 13, 300, 70_350],
        ] {
            let mut filter = ClientFilter::default();
            let mut seen = Vec::new();
            let mut last = 0;
            for &cut in cuts.iter().chain([wire.len()].iter()) {
                let piece = &wire[last..cut];
                let mut buf = vec![0u8; FILTER_HEADROOM + piece.len()];
                buf[FILTER_HEADROOM..].copy_from_slice(piece);
                let end = buf.len();
                filter.filter(&mut buf, FILTER_HEADROOM, end, &mut |f| seen.push(f));
                last = cut;
            }
            assert_eq!(seen, expected, "cuts {cuts:?}");
        }
    }

    #[test]
    fn cursor_finds_boundaries_in_any_split() {
        let server_frame = |len: usize| {
            let mut f = vec![0x82];
            if len < 126 {
                f.push(len as u8);
            } else {
                f.push(126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            f.extend(std::iter::repeat_n(0u8, len));
            f
        };
        let frames = [server_frame(3), server_frame(0), server_frame(1000)];
        let wire = frames.concat();
        let ends: Vec<usize> = frames
            .iter()
            .scan(0, |acc, f| {
                *acc += f.len();
                Some(*acc)
            })
            .collect();
        let mut cursor = FrameCursor::default();
        for i in 0..wire.len() {
            cursor.advance(&wire[i..i + 1]);
            assert_eq!(cursor.at_boundary(), ends.contains(&(i + 1)), "at {i}");
        }
    }

    #[test]
    fn control_frames_are_well_formed() {
        assert_eq!(ping_frame(&PING_PAYLOAD)[..2], [0x89, 8]);
        let close = going_away_frame();
        let mask = &close[2..6];
        assert_eq!(
            [close[6] ^ mask[0], close[7] ^ mask[1]],
            1001u16.to_be_bytes()
        );
    }
}
