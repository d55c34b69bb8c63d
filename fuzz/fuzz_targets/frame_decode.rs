//! `Frame::decode` (every binary message from tasks and peers): never panics, and a frame that
//! decodes encodes back to the same bytes.
#![no_main]

use bytes::Bytes;
use fedbus_proto::link::Request;
use fedbus_proto::{encode_frame, Frame, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = Frame::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let h = f.header;
    let again = encode_frame(
        h.kind,
        h.flags,
        h.hops,
        h.partition,
        h.request_id,
        &f.meta,
        &f.payload,
    );
    assert_eq!(&again[..], data, "re-encoding a decoded frame changed it");
    // Validated metadata: the entries tile the block exactly.
    let tiled: usize = f.meta_entries().map(|(_, v)| 3 + v.len()).sum();
    assert_eq!(tiled, f.meta.len());
    assert_eq!(HEADER_LEN + f.meta.len() + f.payload.len(), data.len());
    // What the task side reads of a request.
    let r = Request::new(f, "r", 0);
    let _ = (r.app(), r.role(), r.service(), r.module(), r.function());
    let _ = (
        r.wsid(),
        r.method(),
        r.subject(),
        r.content_type(),
        r.head(),
    );
});
