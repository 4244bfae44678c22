#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    token_sidecar::run_cli()
}
