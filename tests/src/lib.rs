//! Helpers for the integration tests: network namespace labs and process management.
