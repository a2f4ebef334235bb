//! Sentence embeddings computed by the host (`gigafactory:ai` `embed` and
//! the OpenAI-compatible `/embeddings`): texts are tokenised here, run
//! through the model like any wasi-nn call (so they batch with every other
//! caller's), then pooled over their tokens and normalised.
//!
//! ```toml
//! [embedding]
//! vocabulary = "vocab.txt"     # BERT WordPiece vocabulary (uncased)
//! max_tokens = 256             # per text, [CLS] and [SEP] included
//! output = "last_hidden_state" # [batch, tokens, dimensions]
//! pooling = "mean"             # or "cls"
//! normalize = true             # L2-normalise each vector
//! ```

use std::path::Path;

use crate::text::WordPiece;
use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, NnError};
use super::graph::Graph;
use super::tensor::{ElementType, HostTensor};

/// The most texts one `embed` call may send.
pub const MAX_TEXTS: usize = 2048;

/// `[embedding]` in a sentence-embedding model's `model.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// The WordPiece vocabulary (`vocab.txt`), relative to the model's directory.
    pub vocabulary: String,
    /// Tokens per text, special tokens included; longer texts are truncated.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// The output with one vector per token: `[batch, tokens, dimensions]`.
    pub output: String,
    /// How token vectors become one vector.
    #[serde(default)]
    pub pooling: Pooling,
    /// Whether vectors are scaled to unit length (default `true`).
    #[serde(default = "default_normalize")]
    pub normalize: bool,
}

fn default_max_tokens() -> usize {
    256
}

fn default_normalize() -> bool {
    true
}

/// How token vectors are pooled into a sentence vector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The mean of the text's tokens (sentence-transformers' default).
    #[default]
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
}

/// Vectors for a list of texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One vector per text, in the order given.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the texts became, special tokens included.
    pub tokens: u64,
}

/// One input to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    /// Text, tokenised with the model's vocabulary.
    Text(String),
    /// Ids of the model's own vocabulary, taken as they are (special
    /// tokens are the caller's).
    Tokens(Vec<i64>),
}

/// The model's tokenizer and the inputs it feeds.
pub struct Embedder {
    config: EmbeddingConfig,
    tokenizer: WordPiece,
    /// Whether the graph takes `attention_mask` / `token_type_ids` too.
    attention_mask: bool,
    token_type_ids: bool,
}

/// One call's worth of tokenised texts: each row padded to the longest.
pub(super) struct Chunk {
    /// Indices of these texts in the caller's list.
    pub indices: Vec<usize>,
    /// Named int64 inputs, `[rows, tokens]`.
    pub inputs: Vec<(String, HostTensor)>,
    /// The attention mask, row-major, for pooling.
    mask: Vec<i64>,
    tokens: usize,
}

impl Embedder {
    /// Reads the vocabulary next to the model and checks that `graph` takes
    /// BERT's inputs and has the configured output.
    pub(super) fn new(
        config: EmbeddingConfig,
        dir: &Path,
        graph: &dyn Graph,
    ) -> Result<Self, String> {
        let path = dir.join(&config.vocabulary);
        let vocabulary = std::fs::read_to_string(&path)
            .map_err(|e| format!("[embedding] vocabulary {}: {e}", path.display()))?;
        let tokenizer = WordPiece::from_vocab(&vocabulary)
            .map_err(|e| format!("[embedding] vocabulary {}: {e}", path.display()))?;
        if config.max_tokens < 2 {
            return Err("[embedding] max_tokens must be at least 2".into());
        }
        let mut has_ids = false;
        let (mut attention_mask, mut token_type_ids) = (false, false);
        for input in graph.inputs() {
            match input.name.as_str() {
                "input_ids" => has_ids = true,
                "attention_mask" => attention_mask = true,
                "token_type_ids" => token_type_ids = true,
                other => {
                    return Err(format!(
                        "[embedding] the graph takes {other:?}; embedding models take \
                         input_ids, attention_mask and token_type_ids"
                    ));
                }
            }
        }
        if !has_ids {
            return Err("[embedding] the graph has no input_ids input".into());
        }
        if !graph.outputs().iter().any(|o| o.name == config.output) {
            return Err(format!(
                "[embedding] the graph has no output {:?}",
                config.output
            ));
        }
        Ok(Self {
            config,
            tokenizer,
            attention_mask,
            token_type_ids,
        })
    }

    /// Why `ids` cannot be embedded as they are, if they cannot: they
    /// must be ids of the model's own vocabulary, at most `max_tokens`.
    pub(super) fn check_tokens(&self, ids: &[i64]) -> Result<(), String> {
        let size = self.tokenizer.vocab_size();
        if ids.is_empty() || ids.len() > self.config.max_tokens {
            return Err(format!(
                "send 1 to {} token ids per input, not {}",
                self.config.max_tokens,
                ids.len()
            ));
        }
        match ids.iter().find(|&&id| !(0..size).contains(&id)) {
            Some(id) => Err(format!(
                "token id {id} is not in the model's vocabulary (ids 0 to {})",
                size - 1
            )),
            None => Ok(()),
        }
    }

    /// The `[embedding]` settings.
    pub fn config(&self) -> &EmbeddingConfig {
        &self.config
    }

    /// Tokenises `inputs` (token ids are taken as they are) and groups
    /// them, shortest first, into calls of at most `rows` inputs each (so
    /// padding stays small).
    pub(super) fn chunks(&self, inputs: &[EmbedInput], rows: usize, tokens: usize) -> Vec<Chunk> {
        let encoded: Vec<Vec<i64>> = inputs
            .iter()
            .map(|input| match input {
                EmbedInput::Text(text) => self.tokenizer.encode(text, self.config.max_tokens).ids,
                EmbedInput::Tokens(ids) => ids.clone(),
            })
            .collect();
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| encoded[i].len());
        // Shortest first, so each chunk's width is its last text's length.
        let mut chunks = Vec::new();
        let mut start = 0;
        for end in 1..=order.len() {
            let next = order.get(end);
            let full = next.is_none_or(|&i| {
                let count = end + 1 - start;
                count > rows.max(1) || count * encoded[i].len() > tokens
            });
            if full {
                chunks.push(self.chunk(&order[start..end], &encoded));
                start = end;
            }
        }
        chunks
    }

    fn chunk(&self, indices: &[usize], encoded: &[Vec<i64>]) -> Chunk {
        let rows = indices.len();
        let width = indices.iter().map(|&i| encoded[i].len()).max().unwrap_or(0);
        let mut ids = vec![0i64; rows * width];
        let mut mask = vec![0i64; rows * width];
        let mut tokens = 0;
        for (row, &i) in indices.iter().enumerate() {
            let text = &encoded[i];
            ids[row * width..row * width + text.len()].copy_from_slice(text);
            mask[row * width..row * width + text.len()].fill(1);
            tokens += text.len();
        }
        let dims = vec![rows as u32, width as u32];
        let tensor = |values: &[i64]| HostTensor {
            dims: dims.clone(),
            ty: ElementType::I64,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let mut inputs = vec![("input_ids".to_string(), tensor(&ids))];
        if self.attention_mask {
            inputs.push(("attention_mask".to_string(), tensor(&mask)));
        }
        if self.token_type_ids {
            inputs.push(("token_type_ids".to_string(), tensor(&vec![0; rows * width])));
        }
        Chunk {
            indices: indices.to_vec(),
            inputs,
            mask,
            tokens,
        }
    }

    /// Pools one chunk's model outputs into a vector per text.
    pub(super) fn pool(
        &self,
        chunk: &Chunk,
        outputs: &[(String, HostTensor)],
    ) -> Result<Vec<Vec<f32>>, NnError> {
        let name = &self.config.output;
        let output = outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, tensor)| tensor)
            .ok_or_else(|| fault(format!("the model returned no {name:?}")))?;
        let rows = chunk.indices.len();
        let width = chunk.mask.len() / rows.max(1);
        let [r, w, dims] = output.dims[..] else {
            return Err(fault(format!(
                "{name:?} has shape {:?}, expected [texts, tokens, dimensions]",
                output.dims
            )));
        };
        if output.ty != ElementType::Fp32 || r as usize != rows || w as usize != width {
            return Err(fault(format!(
                "{name:?} is a {:?} tensor of {:?}, expected FP32 [{rows}, {width}, _]",
                output.ty, output.dims
            )));
        }
        let dims = dims as usize;
        let values: Vec<f32> = output
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((0..rows)
            .map(|row| {
                let tokens = &values[row * width * dims..(row + 1) * width * dims];
                let mask = &chunk.mask[row * width..(row + 1) * width];
                let mut vector = match self.config.pooling {
                    Pooling::Mean => mean(tokens, mask, dims),
                    Pooling::Cls => tokens[..dims].to_vec(),
                };
                if self.config.normalize {
                    normalize(&mut vector);
                }
                vector
            })
            .collect())
    }
}

impl Chunk {
    /// Tokens in this chunk, padding not counted.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// The model's outputs do not fit `[embedding]`: the operator's fault,
/// not the caller's.
fn fault(why: String) -> NnError {
    NnError::new(ErrorCode::RuntimeError, why)
}

fn mean(tokens: &[f32], mask: &[i64], dims: usize) -> Vec<f32> {
    let mut sum = vec![0f32; dims];
    let mut count = 0f32;
    for (token, &m) in tokens.chunks_exact(dims).zip(mask) {
        if m == 1 {
            count += 1.0;
            sum.iter_mut().zip(token).for_each(|(s, v)| *s += v);
        }
    }
    sum.iter_mut().for_each(|s| *s /= count.max(1.0));
    sum
}

fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    vector.iter_mut().for_each(|v| *v /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_hold_at_most_their_rows_and_tokens() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-minilm-l6-v2");
        if !dir.join("model.onnx").is_file() {
            eprintln!(
                "skipping: no model.onnx in {} (run ./dev models)",
                dir.display()
            );
            return;
        }
        let text = std::fs::read_to_string(dir.join("model.toml")).unwrap();
        let config: super::super::ModelConfig = toml::from_str(&text).unwrap();
        let graph =
            super::super::engines::tract::TractGraph::from_path(&dir.join("model.onnx")).unwrap();
        let embedder = Embedder::new(config.embedding.unwrap(), &dir, &*graph).unwrap();
        let texts: Vec<EmbedInput> = (0..40)
            .map(|n| EmbedInput::Text("word ".repeat(n % 13 + 1)))
            .collect();
        let chunks = embedder.chunks(&texts, 8, 48);
        let mut seen: Vec<usize> = chunks.iter().flat_map(|c| c.indices.clone()).collect();
        seen.sort();
        assert_eq!(seen, (0..40).collect::<Vec<_>>(), "every text once");
        for chunk in &chunks {
            let dims = &chunk.inputs[0].1.dims;
            assert!(dims[0] <= 8 && dims[0] * dims[1] <= 48, "{dims:?}");
        }
    }

    #[test]
    fn mean_pooling_skips_padding_and_normalises() {
        // Two tokens and one padded position, 2 dimensions.
        let mut vector = mean(&[1.0, 2.0, 3.0, 4.0, 100.0, 100.0], &[1, 1, 0], 2);
        assert_eq!(vector, vec![2.0, 3.0]);
        normalize(&mut vector);
        let norm: f32 = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "{norm}");
    }
}
