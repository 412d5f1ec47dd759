#![no_main]
// See homeport_fuzz::relay_server_tcp for the input format and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| homeport_fuzz::relay_server_tcp(data));
