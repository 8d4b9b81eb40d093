//! Replays the checked-in fuzz corpora (`fuzz/corpus/*`) through the same entry points the
//! `cargo fuzz` targets call, so CI proves every input the fuzzers once found interesting
//! still passes, without a fuzzing toolchain.

use std::path::Path;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "corpus {target} has only {} inputs",
        files.len()
    );
    files
}

#[test]
fn protocol_corpus_replays() {
    for (name, data) in corpus("protocol") {
        let r = std::panic::catch_unwind(|| vgpu_emu::server::fuzz_dispatch(&data));
        assert!(r.is_ok(), "{name} fails");
    }
}

#[test]
fn register_corpus_replays() {
    let mut displaying = 0;
    for (name, data) in corpus("registers") {
        let r = std::panic::catch_unwind(|| {
            data.split_first().map_or(Default::default(), |(&ty, ops)| {
                vgpu_model::fuzz::run_register_ops(ty, ops)
            })
        });
        match r {
            Ok(stats) => displaying += stats.displaying,
            Err(_) => panic!("{name} fails"),
        }
    }
    assert!(displaying > 0, "the corpus reaches a displaying mode");
}

#[test]
fn connection_corpus_replays() {
    for (name, data) in corpus("connection") {
        let r = std::panic::catch_unwind(|| vgpu_emu::server::fuzz_connection(&data));
        assert!(r.is_ok(), "{name} fails");
    }
}

#[test]
fn type_file_corpus_replays() {
    for (name, data) in corpus("type_file") {
        let r = std::panic::catch_unwind(|| vgpu_model::fuzz::type_file(&data));
        assert!(r.is_ok(), "{name} fails");
    }
}

#[test]
fn lock_file_corpus_replays() {
    for (name, data) in corpus("lock_file") {
        let r = std::panic::catch_unwind(|| vgpu_emu::lock::fuzz_parse(&data));
        assert!(r.is_ok(), "{name} fails");
    }
}

#[test]
fn gpu_commands_corpus_replays() {
    let mut displaying = 0;
    for (name, data) in corpus("gpu_commands") {
        match std::panic::catch_unwind(|| vgpu_model::fuzz::run_gpu_commands(&data)) {
            Ok(stats) => displaying += stats.displaying,
            Err(_) => panic!("{name} fails"),
        }
    }
    assert!(displaying > 0, "the corpus reaches a displaying head");
}

#[test]
fn rfb_corpus_replays() {
    for (name, data) in corpus("rfb") {
        let r = std::panic::catch_unwind(|| vgpu_emu::display::rfb::fuzz_session(&data));
        assert!(r.is_ok(), "{name} fails");
    }
}

#[test]
fn http_corpus_replays() {
    for (name, data) in corpus("http") {
        let r = std::panic::catch_unwind(|| vgpu_emu::display::web::fuzz_request(&data));
        assert!(r.is_ok(), "{name} fails");
    }
}

#[test]
fn domain_xml_corpus_replays() {
    for (name, data) in corpus("domain_xml") {
        let r = std::panic::catch_unwind(|| vgpu_emu::integrate::libvirt::fuzz_merge(&data));
        assert!(r.is_ok(), "{name} fails");
    }
}
