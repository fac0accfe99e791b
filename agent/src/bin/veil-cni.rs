//! `veil-cni`: the CNI 1.0 plugin the container runtime runs for every pod of a veil node
//! (`veil_agent::cni`).

fn main() -> std::process::ExitCode {
    veil_agent::cni::main()
}
