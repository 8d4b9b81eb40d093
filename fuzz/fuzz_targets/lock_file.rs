//! A lock file of user type versions.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vgpu_emu::lock::fuzz_parse(data);
});
