//! Compiles the model's `vocab.txt` into a sorted table, so the tokenizer
//! costs nothing at start-up (every request is a fresh instance).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=GIGAFACTORY_MODELS");
    let models = std::env::var_os("GIGAFACTORY_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../../models")
        });
    let vocab = models.join("all-minilm-l6-v2/vocab.txt");
    if !vocab.is_file() {
        panic!(
            "{} not found: fetch the models first (./dev models) or point GIGAFACTORY_MODELS at the model repository",
            vocab.display()
        );
    }
    println!("cargo:rerun-if-changed={}", vocab.display());
    let text = std::fs::read_to_string(&vocab).expect("reading vocab.txt");
    let table = gigafactory_sdk::text::sorted_table_source(&text);
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("vocab_table.rs");
    std::fs::write(out, table).expect("writing the vocabulary table");
}
