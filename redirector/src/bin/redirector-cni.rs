//! `redirector-cni`: the chained CNI plugin (see `redirector::cni::plugin`).
fn main() -> std::process::ExitCode {
    // Failures before the plugin's own logging is set up (e.g. stdin that is not JSON) go here.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    redirector::cni::plugin::main()
}
