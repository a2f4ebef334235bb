//! What a model file declares — an ONNX graph's inputs and outputs, a GGUF
//! file's metadata — and the `model.toml` made from it when an operator
//! adds a model without writing one. The generated file says what it read
//! in comments and is the operator's to edit.

use std::fmt::Write as _;
use std::path::Path;

use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::prelude::Framework as _;

use super::config::{ModelConfig, ModelFormat};

/// What the operator said about the model besides its file.
#[derive(Debug, Clone, Default)]
pub struct Hints {
    /// The model file, relative to the model's directory.
    pub file: String,
    /// The format, when the operator named it (else read from the file).
    pub format: Option<ModelFormat>,
    /// What the model does (`feature-extraction`, `text-generation` …).
    pub task: Option<String>,
    /// Whether every tenant may use it.
    pub public: bool,
    /// The model's other files (a tokenizer's `vocab.txt` …).
    pub siblings: Vec<String>,
}

/// The format of the file at `path` (called `name` in its model's
/// directory): GGUF by its magic bytes, ONNX by its name or by what the
/// operator said.
pub fn format_of(
    path: &Path,
    name: &str,
    named: Option<ModelFormat>,
) -> Result<ModelFormat, String> {
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
        .map_err(|e| format!("reading {}: {e}", path.display()));
    let gguf = read.is_ok() && &magic == b"GGUF";
    read?;
    match (named, gguf) {
        (Some(ModelFormat::Gguf), false) => Err(format!(
            "{name} is not a GGUF file (it does not start with the GGUF magic bytes)"
        )),
        (Some(ModelFormat::Onnx), true) => Err(format!(
            "{name} is a GGUF file, not ONNX (format = \"gguf\", --format gguf)"
        )),
        (Some(format), _) => Ok(format),
        (None, true) => Ok(ModelFormat::Gguf),
        (None, false) if name.ends_with(".onnx") => Ok(ModelFormat::Onnx),
        (None, false) => Err(format!(
            "cannot tell the format of {name}: not GGUF (no magic bytes) and not named *.onnx; \
             say --format onnx or --format gguf"
        )),
    }
}

/// A `model.toml` for the model file at `path` (named `hints.file` in the
/// model's directory), from what the file declares; it parses and passes
/// [`ModelConfig::check`].
pub fn generate(path: &Path, hints: &Hints) -> Result<String, String> {
    let text = match format_of(path, &hints.file, hints.format)? {
        ModelFormat::Onnx => onnx(path, hints)?,
        ModelFormat::Gguf => gguf(path, hints)?,
    };
    let config: ModelConfig = toml::from_str(&text)
        .map_err(|e| format!("the generated model.toml does not parse: {e}"))?;
    config.check()?;
    Ok(text)
}

/// A `model.toml` for the LoRA adapter at `path` (a GGUF file named
/// `hints.file`) of the text model `base`.
pub fn adapter_config(
    path: &Path,
    hints: &Hints,
    base: &str,
    scale: f32,
) -> Result<String, String> {
    if format_of(path, &hints.file, Some(ModelFormat::Gguf)).is_err() {
        return Err(format!(
            "{} is not a GGUF file: LoRA adapters are GGUF (llama.cpp's convert_lora_to_gguf.py makes one)",
            hints.file
        ));
    }
    let text = format!(
        "# A LoRA adapter: it runs on {base}'s weights and scheduler, batched with\n\
         # the base's generations and its other adapters'.\n\
         description = {}\nformat = \"gguf\"\nfile = {}\ntask = \"text-generation\"\npublic = {}\n\n\
         [lora]\nbase = {}\nscale = {scale}\n",
        quoted(&format!("LoRA adapter {} of {base}", stem(&hints.file))),
        quoted(&hints.file),
        hints.public,
        quoted(base),
    );
    let config: ModelConfig = toml::from_str(&text)
        .map_err(|e| format!("the generated model.toml does not parse: {e}"))?;
    config.check()?;
    Ok(text)
}

/// One input or output as the graph declares it.
struct Declared {
    name: String,
    ty: &'static str,
    /// Each dimension: a size, or its symbol (`"?"` when unnamed).
    dims: Vec<Result<i64, String>>,
}

impl Declared {
    fn shape(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| match d {
                Ok(n) => n.to_string(),
                Err(symbol) => symbol.clone(),
            })
            .collect();
        format!("[{}]", dims.join(", "))
    }

    fn symbol(&self, axis: usize) -> Option<&str> {
        self.dims.get(axis)?.as_ref().err().map(String::as_str)
    }
}

fn onnx(path: &Path, hints: &Hints) -> Result<String, String> {
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| format!("reading the ONNX graph in {}: {e:#}", path.display()))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| format!("{} holds no ONNX graph", path.display()))?;
    let constants: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let declared = |values: &[tract_onnx::pb::ValueInfoProto]| -> Vec<Declared> {
        values
            .iter()
            .filter(|v| !constants.contains(v.name.as_str()))
            .map(|v| {
                let tensor = v.r#type.as_ref().and_then(|t| match &t.value {
                    Some(TypeValue::TensorType(tensor)) => Some(tensor),
                    _ => None,
                });
                let dims = tensor
                    .and_then(|t| t.shape.as_ref())
                    .map(|shape| {
                        shape
                            .dim
                            .iter()
                            .map(|d| match &d.value {
                                Some(Dim::DimValue(n)) => Ok(*n),
                                Some(Dim::DimParam(symbol)) if !symbol.is_empty() => {
                                    Err(symbol.clone())
                                }
                                _ => Err("?".to_string()),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Declared {
                    name: v.name.clone(),
                    ty: onnx_type(tensor.map_or(0, |t| t.elem_type)),
                    dims,
                }
            })
            .collect()
    };
    let (inputs, outputs) = (declared(&graph.input), declared(&graph.output));
    if inputs.is_empty() || outputs.is_empty() {
        return Err(format!(
            "the ONNX graph in {} declares no inputs or no outputs",
            path.display()
        ));
    }
    let embedding_output = outputs.iter().find(|o| {
        o.dims.len() == 3
            && ["last_hidden_state", "token_embeddings", "hidden_states"].contains(&o.name.as_str())
    });
    let task = hints.task.clone().or_else(|| {
        let names = |n: &[&str]| outputs.iter().any(|o| n.contains(&o.name.as_str()));
        if embedding_output.is_some() || names(&["sentence_embedding", "embeddings"]) {
            Some("feature-extraction".to_string())
        } else {
            None
        }
    });

    let mut out = String::new();
    let producer = [
        proto.producer_name.as_str(),
        proto.producer_version.as_str(),
    ]
    .join(" ")
    .trim()
    .to_string();
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    let _ = writeln!(
        out,
        "# Generated from {} (ONNX IR {}, opset {opset}{}).",
        hints.file,
        proto.ir_version,
        if producer.is_empty() {
            String::new()
        } else {
            format!(", made by {producer}")
        }
    );
    for (kind, list) in [("Inputs", &inputs), ("Outputs", &outputs)] {
        let _ = writeln!(out, "# {kind}:");
        for tensor in list {
            let _ = writeln!(out, "#   {} {} {}", tensor.name, tensor.ty, tensor.shape());
        }
    }
    let description = first_line(&proto.doc_string)
        .or_else(|| first_line(&graph.doc_string))
        .unwrap_or_else(|| format!("{} (ONNX)", stem(&hints.file)));
    let _ = writeln!(out, "description = {}", quoted(&description));
    let _ = writeln!(out, "format = \"onnx\"");
    let _ = writeln!(out, "file = {}", quoted(&hints.file));
    if let Some(task) = &task {
        let _ = writeln!(out, "task = {}", quoted(task));
    }
    let _ = writeln!(out, "public = {}", hints.public);

    // Batching across callers, where the graph shows how to do it safely:
    // a shared symbolic batch axis, and either no other symbolic axis or a
    // transformer's sequence axis masked by `attention_mask` (so padding
    // with 0 does not change a row's result).
    let batch = inputs[0].symbol(0).filter(|batch| {
        inputs.iter().all(|i| i.symbol(0) == Some(*batch))
            && outputs.iter().all(|o| o.symbol(0) == Some(*batch))
    });
    let others_fixed = |list: &[Declared]| {
        list.iter()
            .all(|t| t.dims.iter().skip(1).all(|d| d.is_ok()))
    };
    let sequence = inputs[0].symbol(1).filter(|sequence| {
        inputs.iter().any(|i| i.name == "attention_mask")
            && inputs
                .iter()
                .all(|i| i.dims.len() == 2 && i.symbol(1) == Some(*sequence) && i.ty == "int64")
    });
    match (batch, sequence) {
        (Some(_), None) if others_fixed(&inputs) && others_fixed(&outputs) => {
            out.push_str(
                "\n# Calls from every tenant run together, up to 32 rows at a time.\n\
                 [batching]\nmax_batch = 32\nmax_queue_delay_ms = 0\nmax_queue = 512\n",
            );
        }
        (Some(_), Some(sequence)) => {
            let _ = writeln!(
                out,
                "\n# Calls from every tenant run together: inputs padded with 0 along\n\
                 # `{sequence}` (masked out by attention_mask), outputs cut back to each\n\
                 # caller's length.\n[batching]\nmax_batch = 32\nmax_queue_delay_ms = 0\nmax_queue = 512"
            );
            out.push_str("\n[batching.pad]\n");
            for input in &inputs {
                let _ = writeln!(out, "{} = {{ axis = 1, value = 0 }}", key(&input.name));
            }
            let sliced: Vec<&Declared> = outputs
                .iter()
                .filter(|o| o.symbol(1) == Some(sequence))
                .collect();
            if !sliced.is_empty() {
                out.push_str("\n[batching.slice]\n");
                for output in sliced {
                    let _ = writeln!(
                        out,
                        "{} = {{ axis = 1, like = {} }}",
                        key(&output.name),
                        quoted(&inputs[0].name)
                    );
                }
            }
        }
        _ => out.push_str(
            "\n# No [batching]: the graph's axes do not show how calls could share a\n\
             # batch. Add one by hand if they can.\n",
        ),
    }

    let has_vocabulary = hints.siblings.iter().any(|f| f == "vocab.txt");
    match embedding_output {
        Some(output)
            if task.as_deref() == Some("feature-extraction")
                && has_vocabulary
                && inputs.iter().any(|i| i.name == "input_ids") =>
        {
            let _ = writeln!(
                out,
                "\n# Sentence embeddings for gigafactory:ai `embed` and /openai/v1/embeddings:\n\
                 # WordPiece tokens, mean-pooled over the mask and L2-normalised.\n\
                 [embedding]\nvocabulary = \"vocab.txt\"\nmax_tokens = 256\noutput = {}\n\
                 pooling = \"mean\"\nnormalize = true",
                quoted(&output.name)
            );
        }
        _ => {}
    }
    Ok(out)
}

fn gguf(path: &Path, hints: &Hints) -> Result<String, String> {
    let header = crate::llm::read_header(path)?;
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated from {} (GGUF, {} MiB): {} architecture, trained context {} tokens,\n\
         # {}.",
        hints.file,
        size >> 20,
        header.architecture,
        header
            .context_length
            .map_or_else(|| "unknown".to_string(), |n| n.to_string()),
        if header.chat_template {
            "chat template inside"
        } else {
            "no chat template (chat prompts use ChatML)"
        }
    );
    let description = header
        .name
        .clone()
        .unwrap_or_else(|| stem(&hints.file).to_string());
    let _ = writeln!(
        out,
        "description = {}",
        quoted(&format!("{description} ({}, GGUF)", header.architecture))
    );
    out.push_str("format = \"gguf\"\n");
    let _ = writeln!(out, "file = {}", quoted(&hints.file));
    let _ = writeln!(
        out,
        "task = {}",
        quoted(hints.task.as_deref().unwrap_or("text-generation"))
    );
    let _ = writeln!(out, "public = {}", hints.public);
    out.push_str("# Its KV cache is allocated when it loads: load it when first called.\n");
    out.push_str("load = \"first-use\"\n");
    // The KV budget is max_sequences × context_tokens: a trained context
    // of 128k tokens would take gigabytes per sequence.
    let context = header.context_length.map_or(2048, |n| n.clamp(512, 4096));
    let _ = writeln!(
        out,
        "\n# Continuous batching: up to max_sequences generations decode together,\n\
         # each with a KV cache of context_tokens (prompt and answer).\n\
         [generation]\nmax_sequences = 8\ncontext_tokens = {context}"
    );
    Ok(out)
}

/// ONNX's `TensorProto.DataType` numbers, in the spelling of its docs.
fn onnx_type(code: i32) -> &'static str {
    match code {
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "float64",
        12 => "uint32",
        13 => "uint64",
        16 => "bfloat16",
        _ => "unknown",
    }
}

fn first_line(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(200).collect())
}

fn stem(file: &str) -> &str {
    Path::new(file)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(file)
}

/// A TOML basic string.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// A TOML key: bare when it can be, else quoted.
fn key(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        name.to_string()
    } else {
        quoted(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(model: &str, file: &str) -> std::path::PathBuf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(model)
            .join(file);
        assert!(
            path.is_file(),
            "{} is missing: run ./dev models",
            path.display()
        );
        path
    }

    #[test]
    fn minilm_gets_batching_with_padding_and_embeddings() {
        let hints = Hints {
            file: "model.onnx".into(),
            siblings: vec!["vocab.txt".into(), "tokenizer.json".into()],
            ..Hints::default()
        };
        let text = generate(&shipped("all-minilm-l6-v2", "model.onnx"), &hints).unwrap();
        let config: ModelConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.format, ModelFormat::Onnx);
        assert_eq!(config.task.as_deref(), Some("feature-extraction"));
        let batching = config.batching.expect("batching");
        assert_eq!(batching.pad.len(), 3, "{text}");
        assert!(batching.slice.contains_key("last_hidden_state"), "{text}");
        let embedding = config.embedding.expect("embedding");
        assert_eq!(embedding.output, "last_hidden_state");
        assert!(text.contains("#   input_ids int64"), "{text}");
    }

    #[test]
    fn smollm_gets_generation_from_its_header() {
        let hints = Hints {
            file: "model.gguf".into(),
            ..Hints::default()
        };
        let text = generate(&shipped("smollm2-135m-instruct", "model.gguf"), &hints).unwrap();
        let config: ModelConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.format, ModelFormat::Gguf);
        assert!(text.contains("llama architecture"), "{text}");
        assert!(text.contains("chat template inside"), "{text}");
        assert_eq!(config.generation.unwrap().context_tokens, 4096);
    }

    #[test]
    fn a_wrong_format_is_refused_naming_the_file() {
        let onnx = shipped("all-minilm-l6-v2", "model.onnx");
        let refused = format_of(&onnx, "model.onnx", Some(ModelFormat::Gguf)).unwrap_err();
        assert!(refused.contains("not a GGUF file"), "{refused}");
        let gguf = shipped("smollm2-135m-instruct", "model.gguf");
        assert_eq!(
            format_of(&gguf, "weights", None).unwrap(),
            ModelFormat::Gguf
        );
        assert!(format_of(&onnx, "weights", None).is_err());
        let refused = format_of(&gguf, "model.gguf", Some(ModelFormat::Onnx)).unwrap_err();
        assert!(refused.contains("--format gguf"), "{refused}");
    }
}
