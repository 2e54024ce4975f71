//! Benchmark support; the runner is `bench/src/main.rs`, microbenches in `bench/benches`.
