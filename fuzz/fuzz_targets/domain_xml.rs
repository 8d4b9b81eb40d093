//! A domain XML (from a user's file or virt-launcher) merged with an instance: no panic, and a
//! merged domain parses again, holds the device once and refuses a second merge.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vgpu_emu::integrate::libvirt::fuzz_merge(data);
});
