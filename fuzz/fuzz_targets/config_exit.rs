#![no_main]
// See homeport_fuzz::config_exit for the input format and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| homeport_fuzz::config_exit(data));
