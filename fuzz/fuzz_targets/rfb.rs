//! Bytes from an RFB viewer, split arbitrarily: handshake, client messages, and every update
//! request answered with encoded frames in the negotiated format and encodings.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vgpu_emu::display::rfb::fuzz_session(data);
});
