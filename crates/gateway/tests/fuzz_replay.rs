//! The fuzz targets on stable, in every `cargo test`: each target's seeds
//! (and any corpus a local fuzzing run left in `fuzz/corpus/<target>`) are
//! replayed, then mutated deterministically (seeded xorshift: bit flips,
//! interesting bytes, dictionary tokens, splices, truncations) a bounded
//! number of times. Real coverage-guided fuzzing runs with cargo-fuzz on
//! nightly (`crates/gateway/fuzz`, `crates/phoenix-channel/fuzz`; commands
//! in README.md); inputs it finds that crash go into `seeds/` and stay here.

use std::path::{Path, PathBuf};

/// Mutants per seed: enough to reach the parsers' error paths on every CI
/// run, few enough to stay around a second or two in a debug build.
const MUTANTS_PER_SEED: usize = 2000;

const DICTIONARY: &[&[u8]] = &[
    b"eq.",
    b"neq.",
    b"lt.",
    b"gte.",
    b"in.(",
    b"not.",
    b"like.",
    b"ilike.",
    b"match.",
    b"imatch.",
    b"is.",
    b"isdistinct.",
    b"null",
    b"true",
    b"%",
    b"_",
    b"\\",
    b"\"",
    b",",
    b"(",
    b")",
    b"=",
    b".",
    b"\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b"\"messages\"",
    b"\"payload\"",
    b"\"topic\"",
    b"\"event\"",
    b"1e400",
    b"-0",
    b"\\u0000",
    b"\\ud800",
    b"[[[[[[[[",
    b"]]]]]]]]",
    b"(?:a{99}){99}",
    b"(a+)+$",
    b"\xff\xfe",
    b"\xc3",
    b"realtime:",
];

const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b',', b'(', b')', b'.', b'%',
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, others: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(7) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let token = DICTIONARY[rng.below(DICTIONARY.len())];
                input.splice(at..at, token.iter().copied());
            }
            3 if at < input.len() => {
                let end = (at + 1 + rng.below(16)).min(input.len());
                input.drain(at..end);
            }
            4 if at < input.len() => {
                let end = (at + 1 + rng.below(32)).min(input.len());
                let chunk: Vec<u8> = input[at..end].to_vec();
                input.splice(at..at, chunk);
            }
            5 => input.truncate(at),
            _ => {
                let other = &others[rng.below(others.len())];
                let from = rng.below(other.len() + 1);
                let to = (from + rng.below(64)).min(other.len());
                input.splice(at..at, other[from..to].iter().copied());
            }
        }
    }
}

fn inputs(dirs: &[PathBuf]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths.into_iter().filter(|p| p.is_file()) {
            out.push(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())));
        }
    }
    out
}

/// Replays and mutates the inputs of `target` under `fuzz_dir`.
fn run(fuzz_dir: &Path, target: &str, seed: u64, check: fn(&[u8])) {
    let dirs = [
        fuzz_dir.join("seeds").join(target),
        fuzz_dir.join("corpus").join(target),
    ];
    let corpus = inputs(&dirs);
    assert!(
        corpus.len() >= 5,
        "{target}: seeds missing in {}",
        dirs[0].display()
    );
    for input in &corpus {
        check(input);
    }
    let mut rng = Rng(seed);
    for input in &corpus {
        for _ in 0..MUTANTS_PER_SEED {
            let mut m = input.clone();
            mutate(&mut rng, &mut m, &corpus);
            let result = std::panic::catch_unwind(|| check(&m));
            if result.is_err() {
                panic!(
                    "{target}: input {:?} ({:?})",
                    String::from_utf8_lossy(&m),
                    m
                );
            }
        }
    }
}

fn gateway_fuzz() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn filter_parser() {
    run(
        &gateway_fuzz(),
        "filter",
        0x5eed_f117,
        gateway::fuzz::filter,
    );
}

#[test]
fn rest_body_parser() {
    run(
        &gateway_fuzz(),
        "rest_body",
        0x5eed_2e57,
        gateway::fuzz::rest_body,
    );
}

#[test]
fn phoenix_codec() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../phoenix-channel/fuzz");
    run(&dir, "decode", 0x5eed_c0de, gateway::fuzz::codec);
}
