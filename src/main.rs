#![forbid(unsafe_code)]

// Only with `--features jemalloc` (docs/benchmarks.md, allocator comparison); glibc otherwise.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    token_sidecar::run_cli()
}
