//! Every decoder must return a value (never panic) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phoenix_channel::{decode_binary, decode_text, Vsn};

fuzz_target!(|data: &[u8]| {
    let _ = decode_text(Vsn::V1, &mut data.to_vec());
    let _ = decode_text(Vsn::V2, &mut data.to_vec());
    let _ = decode_binary(data);
});
