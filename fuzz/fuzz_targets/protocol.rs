//! Bytes from a vfio-user client: framing, validation and dispatch of every message.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vgpu_emu::server::fuzz_dispatch(data);
});
