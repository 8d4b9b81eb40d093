//! Bytes become a sequence of region reads, writes and resets on a bochs device; the scanout
//! must never leave VRAM or the type's limits.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((&ty, ops)) = data.split_first() {
        vgpu_model::fuzz::run_register_ops(ty, ops);
    }
});
