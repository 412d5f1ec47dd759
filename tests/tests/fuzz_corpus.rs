//! The fuzz targets' bodies (`fuzz/src/lib.rs`, which cargo-fuzz drives on nightly) run here on
//! every committed seed (`fuzz/corpus/<target>/seed-*`) and on the inputs of the crashes fuzzing
//! found (`fuzz/regressions/<target>/*`), on stable, in `cargo test`: a change that breaks a
//! decoder's checks on them fails here even where no fuzzer runs.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path, seeds_only: bool) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| {
            !seeds_only
                || p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seed-"))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_target_passes_its_committed_seeds() {
    for (name, body) in targets::TARGETS {
        let seeds = files(&fuzz_dir().join("corpus").join(name), true);
        assert!(
            !seeds.is_empty(),
            "fuzz/corpus/{name}/ has no seed-* files (write them: HOMEPORT_WRITE_SEEDS=1 cargo test -p homeport-tests --test fuzz_corpus committed_seeds)"
        );
        for f in seeds {
            eprintln!("{name}: {}", f.display());
            body(&std::fs::read(&f).unwrap());
        }
    }
}

#[test]
fn every_target_passes_the_crashes_fuzzing_found() {
    for (name, body) in targets::TARGETS {
        for f in files(&fuzz_dir().join("regressions").join(name), false) {
            eprintln!("{name}: {}", f.display());
            body(&std::fs::read(&f).unwrap());
        }
    }
}

/// The committed seeds are what `seeds()` makes. With `HOMEPORT_WRITE_SEEDS=1` this test writes
/// them instead (after a change to `seeds()` or to a file a seed is made from, such as the example
/// configs).
#[test]
fn committed_seeds_are_the_generated_ones() {
    let write = std::env::var_os("HOMEPORT_WRITE_SEEDS").is_some_and(|v| v == "1");
    for (target, name, bytes) in targets::seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        let p = dir.join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&p, &bytes).unwrap();
            continue;
        }
        let on_disk = std::fs::read(&p).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} differs from fuzz/src/lib.rs's seeds(): write them again with \
             HOMEPORT_WRITE_SEEDS=1 cargo test -p homeport-tests --test fuzz_corpus committed_seeds",
            p.display()
        );
    }
}

#[test]
fn records_split_as_documented() {
    let mut d = targets::record(7, b"abc");
    d.extend(targets::record(9, b""));
    d.extend([5, 0, 10, 1, 2]); // announces 10 bytes, has 2
    let r: Vec<(u8, &[u8])> = targets::records(&d).collect();
    assert_eq!(r, vec![(7, &b"abc"[..]), (9, &b""[..]), (5, &[1u8, 2][..])]);
}
