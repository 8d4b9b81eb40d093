//! Bytes become a sequence of virtio-gpu control and cursor requests, guest-memory writes and
//! resets on the GPU of an M60 type; budget accounting, responses, fences and scanouts must
//! keep their invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vgpu_model::fuzz::run_gpu_commands(data);
});
