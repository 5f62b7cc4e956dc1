//! `postgres_changes` filters (`<filter>\n<row JSON>`): parse, type checks,
//! evaluation; see `gateway::fuzz::filter` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gateway::fuzz::filter(data));
