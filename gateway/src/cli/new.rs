//! `gigafactory new NAME --template http|embed|chat|command`: a function
//! crate that builds out of this repository with
//! `cargo build --release --target wasm32-wasip2`, with its
//! `gigafactory.toml`. The SDK comes vendored from this build (so the crate
//! builds offline and matches the platform), or from `--sdk PATH`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// A template: its source file and manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// A wasi:http handler (the SDK's `Handler`).
    Http,
    /// Sentence embeddings with a resident model.
    Embed,
    /// Streamed chat with a resident language model.
    Chat,
    /// A plain program (`fn main`, stdin/stdout, CGI environment).
    Command,
}

impl Template {
    fn source(self) -> (&'static str, &'static str) {
        match self {
            Template::Http => ("src/lib.rs", include_str!("templates/http/lib.rs")),
            Template::Embed => ("src/lib.rs", include_str!("templates/embed/lib.rs")),
            Template::Chat => ("src/lib.rs", include_str!("templates/chat/lib.rs")),
            Template::Command => ("src/main.rs", include_str!("templates/command/main.rs")),
        }
    }

    fn manifest(self) -> &'static str {
        match self {
            Template::Http => include_str!("templates/http/gigafactory.toml"),
            Template::Embed => include_str!("templates/embed/gigafactory.toml"),
            Template::Chat => include_str!("templates/chat/gigafactory.toml"),
            Template::Command => include_str!("templates/command/gigafactory.toml"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Template::Http => "http",
            Template::Embed => "embed",
            Template::Chat => "chat",
            Template::Command => "command",
        }
    }

    fn uses_sdk(self) -> bool {
        self != Template::Command
    }
}

/// The SDK crate as this build has it: path in the crate → content.
const SDK: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../../sdk/Cargo.toml")),
    ("src/lib.rs", include_str!("../../../sdk/src/lib.rs")),
    ("src/ai.rs", include_str!("../../../sdk/src/ai.rs")),
    ("src/http.rs", include_str!("../../../sdk/src/http.rs")),
    ("src/nn.rs", include_str!("../../../sdk/src/nn.rs")),
    ("src/text.rs", include_str!("../../../sdk/src/text.rs")),
    (
        "wit/wasi-nn/wasi-nn.wit",
        include_str!("../../../sdk/wit/wasi-nn/wasi-nn.wit"),
    ),
    (
        "wit/gigafactory-ai/ai.wit",
        include_str!("../../../sdk/wit/gigafactory-ai/ai.wit"),
    ),
    (
        "wit/fermyon-spin/llm.wit",
        include_str!("../../../sdk/wit/fermyon-spin/llm.wit"),
    ),
];

/// Where the vendored SDK goes in a new crate.
const VENDORED_SDK: &str = "vendor/gigafactory-sdk";

/// Writes the crate `name` in `./name`; returns what to run next.
pub fn create(name: &str, template: Template, sdk: Option<&Path>) -> Result<String> {
    check_name(name)?;
    let dir = PathBuf::from(name);
    if dir.exists() {
        bail!(
            "{} exists already: choose another name or remove it",
            dir.display()
        );
    }
    let sdk_dependency = match sdk {
        Some(path) => {
            let path = std::path::absolute(path)?;
            if !path.join("Cargo.toml").is_file() {
                bail!(
                    "--sdk {}: no Cargo.toml there (give the SDK crate's directory)",
                    path.display()
                );
            }
            format!("{{ path = {} }}", toml_string(&path.to_string_lossy()))
        }
        None => format!("{{ path = \"{VENDORED_SDK}\" }}"),
    };
    let mut files: Vec<(PathBuf, String)> = vec![
        (
            dir.join("Cargo.toml"),
            cargo_toml(name, template, &sdk_dependency),
        ),
        (
            dir.join("gigafactory.toml"),
            template.manifest().to_string(),
        ),
        (dir.join(".gitignore"), "/target\n".to_string()),
    ];
    let (source, content) = template.source();
    files.push((dir.join(source), content.to_string()));
    if sdk.is_none() && template.uses_sdk() {
        for (path, content) in SDK {
            files.push((dir.join(VENDORED_SDK).join(path), content.to_string()));
        }
    }
    for (path, content) in &files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    // A library's file has `_` for `-`; a program's keeps its name.
    let file = match template {
        Template::Command => name.to_string(),
        _ => name.replace('-', "_"),
    };
    Ok(format!(
        "created {name}/ from the {} template\n\nnext:\n  cd {name}\n  \
         rustup target add wasm32-wasip2   # once\n  \
         cargo build --release --target wasm32-wasip2\n  \
         gigafactory deploy {name} target/wasm32-wasip2/release/{file}.wasm\n  \
         gigafactory invoke {name}",
        template.label()
    ))
}

fn cargo_toml(name: &str, template: Template, sdk: &str) -> String {
    let mut text = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n"
    );
    if template == Template::Command {
        text.push_str(
            "# A program: `cargo build --release --target wasm32-wasip2` writes a\n\
             # wasi:cli command component, run per request with CGI semantics.\n\n",
        );
    } else {
        text.push_str(
            "# A component: without `cdylib`, cargo builds no .wasm for a library.\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\n\
             # The SDK of the platform that made this crate (vendored); or a\n\
             # checkout's: { path = \".../sdk\" }, or { git = \"<repository>\" }.\n",
        );
        text.push_str(&format!("gigafactory-sdk = {sdk}\n\n"));
    }
    text.push_str(
        "[profile.release]\nopt-level = \"s\"\nlto = true\ncodegen-units = 1\nstrip = true\n\n\
         # Its own workspace, wherever it is created.\n[workspace]\n",
    );
    text
}

/// A function name: 1–63 of `a-z0-9-`, starting with a letter, not ending in `-`.
fn check_name(name: &str) -> Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!(
            "{name:?} is not a function name: use 1-63 of a-z, 0-9 and '-', starting with a letter"
        );
    }
    Ok(())
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}
