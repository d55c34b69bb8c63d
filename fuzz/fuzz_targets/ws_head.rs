//! The websocket frame header parser and the close payload check: never panic; a parsed header
//! re-encodes to one that parses the same; unmasking twice is the identity.
#![no_main]

use fedbus_proto::ws::frame::{
    check_close_payload, close_code_allowed, encode_head, parse_head, unmask, MAX_HEADER,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = parse_head(data) {
        assert!(h.header_len <= data.len() && h.header_len <= MAX_HEADER);
        if h.opcode >= 0x8 {
            assert!(h.fin && h.payload_len <= 125, "control frame passed: {h:?}");
        }
        if h.fin && h.payload_len <= u32::MAX as u64 {
            let mut out = [0u8; MAX_HEADER];
            let n = encode_head(h.opcode, h.payload_len as usize, h.mask, &mut out);
            let p = parse_head(&out[..n]).unwrap().unwrap();
            assert_eq!(
                (p.fin, p.opcode, p.mask, p.payload_len),
                (h.fin, h.opcode, h.mask, h.payload_len)
            );
            assert!(n <= h.header_len, "encoding is not minimal");
            // Any shorter prefix is "need more", never an error or a different header.
            for k in 0..n {
                assert_eq!(parse_head(&out[..k]), Ok(None));
            }
        }
        let rest = &data[h.header_len..];
        if let Some(m) = h.mask {
            let mut d = rest.to_vec();
            let off = data[0] as usize;
            unmask(&mut d, m, off);
            for (i, b) in d.iter().enumerate() {
                assert_eq!(*b, rest[i] ^ if m == [0; 4] { 0 } else { m[(off + i) % 4] });
            }
            unmask(&mut d, m, off);
            assert_eq!(d, rest);
        }
    }
    match check_close_payload(data) {
        Ok(None) => assert!(data.is_empty()),
        Ok(Some(code)) => {
            assert!(close_code_allowed(code));
            assert!(std::str::from_utf8(&data[2..]).is_ok());
        }
        Err(code) => assert!(code == 1002 || code == 1007),
    }
});
