//! `lb-chaos` (what `cargo xtask chaos` runs, as root): faults injected under load into a lab of
//! network namespaces running the real `lb run`; prints a table and exits non-zero when an
//! invariant breaks. See `tests/src/chaos.rs`.

fn main() -> std::process::ExitCode {
    lab::chaos::main()
}
