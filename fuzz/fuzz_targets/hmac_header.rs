//! libFuzzer entry point; the checks live in `dispatchd_fuzz::hmac_header` so stable builds test them too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dispatchd_fuzz::hmac_header(data));
