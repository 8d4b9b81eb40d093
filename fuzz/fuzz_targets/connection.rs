//! A whole connection: bytes sent in pieces, with descriptors attached, to a real connection
//! over a socket pair (framing across reads, descriptor attribution, refusal and draining).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vgpu_emu::server::fuzz_connection(data);
});
