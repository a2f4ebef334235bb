//! `gigafactory`: the platform's server and its command line.

fn main() -> std::process::ExitCode {
    gigafactory_gateway::cli::main()
}
