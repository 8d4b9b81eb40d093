//! A user type file: TOML text added to the built-in catalog.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vgpu_model::fuzz::type_file(data);
});
