//! REST broadcast bodies (batch parser and validation, single-body JSON
//! check); see `gateway::fuzz::rest_body` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gateway::fuzz::rest_body(data));
