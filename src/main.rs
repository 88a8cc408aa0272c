//! The `deeprank` command line: [`cli`] parses the arguments into the library's configs, runs
//! the command and prints what it did.

mod cli;

use clap::Parser;

fn main() {
    if let Err(e) = cli::run(cli::Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
