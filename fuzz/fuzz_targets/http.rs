//! Bytes from a browser or anything else on the viewer port's HTTP side: the request head, its
//! route, and the responses and page built from what was parsed.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vgpu_emu::display::web::fuzz_request(data);
});
