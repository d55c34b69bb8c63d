//! Websocket frame headers (RFC 6455 section 5.2), pure: parse, encode, unmask.

/// Opcodes fedbus uses.
pub mod opcode {
    /// Continues a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A UTF-8 text message (the link handshake).
    pub const TEXT: u8 = 0x1;
    /// A binary message (one fedbus frame).
    pub const BINARY: u8 = 0x2;
    /// Close, with an optional code and reason.
    pub const CLOSE: u8 = 0x8;
    /// Ping; the peer answers with a pong carrying the same payload.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// Longest header: 2 + 8 (64-bit length) + 4 (mask).
pub const MAX_HEADER: usize = 14;

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    /// Last fragment of its message.
    pub fin: bool,
    /// One of [`opcode`].
    pub opcode: u8,
    /// Masking key; clients must mask, servers must not.
    pub mask: Option<[u8; 4]>,
    /// Bytes taken by the header itself.
    pub header_len: usize,
    /// Bytes of payload after the header.
    pub payload_len: u64,
}

/// Why a frame header is refused (close code 1002).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// RSV bits set without a negotiated extension.
    Reserved,
    /// Unknown opcode.
    Opcode(u8),
    /// Control frame fragmented or longer than 125 bytes.
    BadControl,
    /// 64-bit length with the top bit set, or a non-minimal length encoding is accepted; only
    /// the top bit is refused.
    BadLength,
}

/// Parses a header from the front of `b`. `Ok(None)`: not enough bytes yet.
pub fn parse_head(b: &[u8]) -> Result<Option<FrameHead>, HeadError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (b[0], b[1]);
    if b0 & 0x70 != 0 {
        return Err(HeadError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let op = b0 & 0x0F;
    match op {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if !fin || (b1 & 0x7F) > 125 {
                return Err(HeadError::BadControl);
            }
        }
        other => return Err(HeadError::Opcode(other)),
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut n) = match b1 & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([b[2], b[3]]) as u64, 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            let len = u64::from_be_bytes(l);
            if len >> 63 != 0 {
                return Err(HeadError::BadLength);
            }
            (len, 10)
        }
        l => (l as u64, 2),
    };
    let mask = if masked {
        if b.len() < n + 4 {
            return Ok(None);
        }
        let m = [b[n], b[n + 1], b[n + 2], b[n + 3]];
        n += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHead {
        fin,
        opcode: op,
        mask,
        header_len: n,
        payload_len: len,
    }))
}

/// Writes a final (FIN) frame header into `out`; returns its length.
pub fn encode_head(op: u8, len: usize, mask: Option<[u8; 4]>, out: &mut [u8; MAX_HEADER]) -> usize {
    out[0] = 0x80 | op;
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len < 126 {
        out[1] = mbit | len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = mbit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mbit | 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if let Some(m) = mask {
        out[n..n + 4].copy_from_slice(&m);
        n += 4;
    }
    n
}

/// XORs `data` with the mask in place. `offset` is the position of `data[0]` in the payload.
/// A zero mask is skipped: fedbus's own clients send mask 0 so that payloads pass unchanged.
pub fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    if mask == [0; 4] {
        return;
    }
    let mut m = [0u8; 4];
    for (i, v) in m.iter_mut().enumerate() {
        *v = mask[(offset + i) % 4];
    }
    let word = u32::from_ne_bytes(m);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i];
    }
}

/// Whether `code` may appear in a close frame on the wire (RFC 6455 section 7.4, with the
/// IANA registry as Autobahn checks it): 1000-1003, 1007-1014, and 3000-4999 (registered
/// and private codes). 1004 is reserved, 1005/1006/1015 must never be sent, everything else
/// below 3000 is unassigned, and 5000 and above is out of range.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Checks the (unmasked) payload of a received close frame, RFC 6455 sections 5.5.1 and 7.4.
///
/// - empty: `Ok(None)` (no status; answer with an empty close or 1000);
/// - one byte, or a code that [`close_code_allowed`] refuses: `Err(1002)` (protocol error);
/// - a reason (the bytes after the code) that is not UTF-8: `Err(1007)`;
/// - otherwise `Ok(Some(code))`.
///
/// The `Err` value is the close code to answer with before closing the connection. The
/// router's reader calls this on every `opcode::CLOSE` frame once the payload is complete and
/// unmasked (`fedbus::ws::conn::WsReader::assemble`), and echoes `code` (or 1000 for
/// `Ok(None)`) on `Ok`. Pure; never panics.
pub fn check_close_payload(payload: &[u8]) -> Result<Option<u16>, u16> {
    match payload {
        [] => Ok(None),
        [_] => Err(1002),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                Err(1002)
            } else if std::str::from_utf8(reason).is_err() {
                Err(1007)
            } else {
                Ok(Some(code))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_round_trip_all_lengths() {
        for &len in &[0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut h = [0u8; MAX_HEADER];
                let n = encode_head(opcode::BINARY, len, mask, &mut h);
                let p = parse_head(&h[..n]).unwrap().unwrap();
                assert_eq!(p.payload_len, len as u64);
                assert_eq!(p.header_len, n);
                assert_eq!(p.mask, mask);
                assert!(p.fin);
                // one byte short is "need more"
                assert_eq!(parse_head(&h[..n - 1]), Ok(None));
            }
        }
    }

    #[test]
    fn bad_heads() {
        assert_eq!(parse_head(&[0x82 | 0x40, 0]), Err(HeadError::Reserved));
        assert_eq!(parse_head(&[0x83, 0]), Err(HeadError::Opcode(3)));
        assert_eq!(parse_head(&[0x09, 0]), Err(HeadError::BadControl)); // fragmented ping
        assert_eq!(parse_head(&[0x89, 126, 0, 200]), Err(HeadError::BadControl));
        let mut b = [0x82u8, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_head(&b), Err(HeadError::BadLength));
        b[2] = 0;
        assert!(parse_head(&b).unwrap().is_some());
    }

    fn close(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        p
    }

    #[test]
    fn close_payload_empty_and_one_byte() {
        assert_eq!(check_close_payload(&[]), Ok(None));
        assert_eq!(check_close_payload(&[0x03]), Err(1002));
        assert_eq!(check_close_payload(&[0xE8]), Err(1002));
    }

    #[test]
    fn close_payload_codes_follow_the_registry() {
        let valid = [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ];
        for code in valid {
            assert_eq!(
                check_close_payload(&close(code, b"")),
                Ok(Some(code)),
                "{code}"
            );
            assert_eq!(check_close_payload(&close(code, b"bye")), Ok(Some(code)));
        }
        let invalid = [
            0u16, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ];
        for code in invalid {
            assert_eq!(check_close_payload(&close(code, b"")), Err(1002), "{code}");
            // A bad code wins over a bad reason.
            assert_eq!(check_close_payload(&close(code, b"\xff")), Err(1002));
        }
        // Exhaustively: the function agrees with the rule.
        for code in 0..=u16::MAX {
            let ok = (1000..=1003).contains(&code)
                || (1007..=1014).contains(&code)
                || (3000..=4999).contains(&code);
            assert_eq!(close_code_allowed(code), ok, "{code}");
        }
    }

    #[test]
    fn close_payload_reason_must_be_utf8() {
        assert_eq!(
            check_close_payload(&close(1000, "héllo ✓".as_bytes())),
            Ok(Some(1000))
        );
        for bad in [
            &b"\xff"[..],
            b"\xc3",
            b"ok\xc3\x28",
            b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80",
        ] {
            assert_eq!(check_close_payload(&close(1000, bad)), Err(1007), "{bad:?}");
        }
        // Longest a control frame can be: 2 + 123 bytes of reason.
        let long = close(4000, &[b'a'; 123]);
        assert_eq!(check_close_payload(&long), Ok(Some(4000)));
    }

    #[test]
    fn unmask_matches_bytewise_xor() {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let orig: Vec<u8> = (0..37u8).collect();
        for off in 0..4 {
            let mut d = orig.clone();
            unmask(&mut d, mask, off);
            for (i, b) in d.iter().enumerate() {
                assert_eq!(*b, orig[i] ^ mask[(off + i) % 4]);
            }
        }
    }
}
