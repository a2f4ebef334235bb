//! Finds the model's `vocab.txt` so the tokenizer can be compiled in.

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
    let vocab = vocab.canonicalize().expect("canonical vocab path");
    println!("cargo:rerun-if-changed={}", vocab.display());
    println!("cargo:rustc-env=EMBED_VOCAB={}", vocab.display());
}
