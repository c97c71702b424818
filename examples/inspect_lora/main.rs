//! Prints what a LoRA file holds: its format (kohya or PEFT / diffusers), the number of
//! modules per model part, each module's rank, alpha and shape, and its safetensors metadata.
//!
//! ```sh
//! source scripts/env.sh
//! cargo run -p lora-examples --example inspect_lora -- my_lora.safetensors
//! cargo run -p lora-examples --example inspect_lora -- my_lora.safetensors --json
//! ```
//! `--json` prints one JSON object (metadata values in full) for scripts; the table cuts
//! metadata values after 96 characters. A file that cannot be read or is no LoRA is reported
//! with its name, exit status 1.

use std::io::Write;
use std::process::ExitCode;

use lora_examples::inspect::Summary;

const USAGE: &str = "usage: inspect_lora FILE [--json]";
/// Metadata values longer than this are cut in the table (`ss_tag_frequency` can be huge).
const MAX_VALUE: usize = 96;

fn main() -> ExitCode {
    let mut file = None;
    let mut json = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            a if a.starts_with("--") => {
                eprintln!("error: unknown option `{a}`\n{USAGE}");
                return ExitCode::from(2);
            }
            _ if file.is_some() => {
                eprintln!("error: one FILE only\n{USAGE}");
                return ExitCode::from(2);
            }
            _ => file = Some(arg),
        }
    }
    let Some(file) = file else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match Summary::read(&file) {
        Ok(s) => {
            let text = if json { format!("{}\n", s.to_json()) } else { s.to_text(MAX_VALUE) };
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
        }
        Err(e) => {
            // Every read error names the file; say it once more only if it does not.
            let msg = e.to_string();
            if msg.contains(&file) {
                eprintln!("error: {msg}");
            } else {
                eprintln!("error: {file}: {msg}");
            }
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
